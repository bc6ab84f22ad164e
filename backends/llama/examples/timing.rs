use llama_backend::LlamaForCausalLM;
use llm_core::formats::ModelSource;
use llm_core::weights::Quantization;
use llm_core::{CausalLm, Cpu, KvCache, LoadCtx, LoadOptions};
use std::time::Instant;
fn main() {
    let path = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let t = Instant::now();
    let source = ModelSource::open(&path).unwrap();
    let ctx = LoadCtx {
        store: source.tensors(),
        device: Default::default(),
        quantization: Quantization::None,
        source: source.describe(),
        host_linear: true,
    };
    let opts = LoadOptions {
        source: path.clone(),
        device: "cpu".into(),
        quantization: "none".into(),
        max_context: 0,
    };
    let model: LlamaForCausalLM<Cpu> =
        LlamaForCausalLM::load(source.config(), &ctx, &opts).unwrap();
    println!("load {:?}", t.elapsed());
    let mut cache = KvCache::new(model.num_layers());
    let prompt: Vec<u32> = (100..131).collect();
    let t = Instant::now();
    let l = model.forward(&prompt, &mut cache, false);
    let _ = l.into_data();
    println!("prefill31 {:?}", t.elapsed());
    for _ in 0..5 {
        let t = Instant::now();
        let l = model.forward(&[5], &mut cache, false);
        let _ = l.into_data();
        println!("decode {:?}", t.elapsed());
    }
}
