//! Host NF4 quantize-on-load speed: `Nf4Weight::quantize_from` on a Llama-3.1-8B MLP weight
//! (14336x4096) of random bf16 bytes, on all host cores, as a load runs it. An 8B model
//! quantizes 7e9 such weights, so ns per weight x 7 is its quantize time in seconds.
//!
//! `cargo run --release -p llm-core --example quantize_bench [CHECKPOINT_DIR]`
//!
//! Also what the host charges around it: writing fresh anonymous pages (every quantized
//! weight's buffers are new allocations), and with a checkpoint directory, reading each
//! linear weight through the shard's mapping alone against quantizing it (as a load does).

use std::time::Instant;

use llm_core::formats::{ModelSource, StoredDtype};
use llm_core::nf4::{FloatSource, Nf4Weight, WeightDtype};

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Split `bytes` over the host's cores and run `f` on each piece.
fn on_all_cores(bytes: &mut [u8], f: impl Fn(&mut [u8]) + Sync) {
    let chunk = bytes.len().div_ceil(threads()).max(1);
    std::thread::scope(|s| {
        for piece in bytes.chunks_mut(chunk) {
            let f = &f;
            s.spawn(move || f(piece));
        }
    });
}

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
    let threads = threads();
    for run in 1..=5 {
        let t = Instant::now();
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
    // Fresh pages: a new 1 GiB buffer written once, one byte per page, on all cores.
    for run in 1..=3 {
        let t = Instant::now();
        let mut fresh = vec![0u8; 1 << 30];
        on_all_cores(&mut fresh, |p| {
            for b in p.iter_mut().step_by(4096) {
                *b = 1;
            }
        });
        let s = t.elapsed().as_secs_f64();
        println!(
            "fresh pages {run}: 1 GiB in {:.1} ms ({:.2} GB/s) on {threads} threads",
            s * 1e3,
            1.0737 / s
        );
    }
    if let Some(dir) = std::env::args().nth(1) {
        checkpoint(std::path::Path::new(&dir));
    }
}

/// Every 2-D float `*proj.weight` of a checkpoint: read through the mapping alone (each byte
/// summed), then quantized, twice each.
fn checkpoint(dir: &std::path::Path) {
    let source = ModelSource::open(dir).expect("a checkpoint directory");
    let store = source.tensors();
    let names: Vec<String> = store
        .names()
        .into_iter()
        .filter(|n| n.ends_with("proj.weight"))
        .collect();
    for pass in ["read", "quantize", "read", "quantize"] {
        let (t, mut weights) = (Instant::now(), 0usize);
        let mut checksum = 0u64;
        for name in &names {
            let raw = store.raw(name).expect("a stored tensor");
            let [o, i] = raw.shape[..] else { continue };
            let Some(src) = FloatSource::stored(raw.dtype, raw.data) else {
                continue;
            };
            weights += o * i;
            if pass == "read" {
                let chunk = raw.data.len().div_ceil(threads()).max(1);
                checksum += std::thread::scope(|s| {
                    let parts: Vec<_> = raw
                        .data
                        .chunks(chunk)
                        .map(|p| s.spawn(move || p.iter().map(|&b| b as u64).sum::<u64>()))
                        .collect();
                    parts.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
                });
            } else {
                let q = Nf4Weight::quantize_from(src, o, i, true, WeightDtype::of(raw.dtype));
                checksum += q.packed[0] as u64;
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "checkpoint {pass}: {} linears, {weights} weights in {:.2} s ({:.2} ns per weight, checksum {checksum})",
            names.len(),
            s,
            s * 1e9 / weights.max(1) as f64
        );
    }
}
