//! Rough CPU timing of load, prefill and decode: `cargo run --release -p llm-llama --example
//! timing -- MODEL [none|nf4]`.
use llama_backend::Llama;
use llm_core::testing::load_cpu;
use llm_core::weights::Quantization;
use llm_core::{CausalLm, KvCache};
use std::time::Instant;

fn main() {
    let path = std::path::PathBuf::from(std::env::args().nth(1).expect("model path"));
    let q = match std::env::args().nth(2).as_deref() {
        Some("nf4") => Quantization::Nf4,
        _ => Quantization::None,
    };
    let t = Instant::now();
    let model = load_cpu::<Llama>(&path, q);
    println!("load {:?}", t.elapsed());
    let mut cache = KvCache::new(model.num_layers());
    let prompt: Vec<u32> = (100..131).collect();
    let t = Instant::now();
    let _ = model.forward(&prompt, &mut cache, false).into_data();
    println!("prefill {} tokens {:?}", prompt.len(), t.elapsed());
    for _ in 0..5 {
        let t = Instant::now();
        let _ = model.forward(&[5], &mut cache, false).into_data();
        println!("decode {:?}", t.elapsed());
    }
}
