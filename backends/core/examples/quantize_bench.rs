//! Host NF4 quantize-on-load speed: `Nf4Weight::quantize_from` on a Llama-3.1-8B MLP weight
//! (14336x4096) of random bf16 bytes, on all host cores, as a load runs it. An 8B model
//! quantizes 7e9 such weights, so ns per weight x 7 is its quantize time in seconds.
//!
//! `cargo run --release -p llm-core --example quantize_bench`

use llm_core::formats::StoredDtype;
use llm_core::nf4::{FloatSource, Nf4Weight, WeightDtype};

fn main() {
    let (out, inp) = (14336, 4096);
    let mut state = 1u64;
    let bytes: Vec<u8> = (0..out * inp)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
            half::bf16::from_f32(x).to_le_bytes()
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for run in 1..=5 {
        let t = std::time::Instant::now();
        let src = FloatSource::stored(StoredDtype::BF16, &bytes).expect("a float dtype");
        let q = Nf4Weight::quantize_from(src, out, inp, true, WeightDtype::BF16);
        let s = t.elapsed().as_secs_f64();
        println!(
            "run {run}: {:.1} ms, {:.2} ns per weight on {threads} threads ({} bytes stored)",
            s * 1e3,
            s * 1e9 / (out * inp) as f64,
            q.stored_bytes()
        );
    }
}
