//! Llama against the reference fixtures (HF transformers fp32 forward of the same weights).

use llama_backend::LlamaForCausalLM;
use llm_core::formats::{ModelSource, SafetensorsDir};
use llm_core::testing::{fixtures, rel_l2, to_vec};
use llm_core::weights::Quantization;
use llm_core::{CausalLm, Cpu, KvCache, LoadCtx, LoadOptions};

fn load(dir: &std::path::Path) -> LlamaForCausalLM<Cpu> {
    let source = ModelSource::open(dir).unwrap();
    let ctx = LoadCtx {
        store: source.tensors(),
        device: Default::default(),
        quantization: Quantization::None,
        source: source.describe(),
        host_linear: true,
    };
    let opts = LoadOptions {
        source: dir.to_path_buf(),
        device: "cpu".into(),
        quantization: "none".into(),
        max_context: 0,
    };
    LlamaForCausalLM::load(source.config(), &ctx, &opts).unwrap()
}

fn reference() -> SafetensorsDir {
    SafetensorsDir::open_file(&fixtures().join("tiny/llama/reference.safetensors")).unwrap()
}

fn ids(r: &SafetensorsDir, name: &str) -> Vec<u32> {
    r.ints(name)
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn tiny_llama_prompt_logits_match_hf() {
    use llm_core::formats::TensorStore;
    let model = load(&fixtures().join("tiny/llama/bf16"));
    let r = reference();
    let input = ids(&r, "input_ids");
    let mut cache = KvCache::new(model.num_layers());
    let logits = to_vec(model.forward(&input, &mut cache, true));
    let expected = r.f32("logits_f32").unwrap();
    let err = rel_l2(&logits, &expected.data);
    assert!(err < 1e-4, "rel L2 {err}");
}

#[test]
fn tiny_llama_greedy_and_kv_cache_decode_match_hf() {
    use llm_core::formats::TensorStore;
    let model = load(&fixtures().join("tiny/llama/bf16"));
    let r = reference();
    let input = ids(&r, "input_ids");
    let greedy = ids(&r, "greedy_f32");
    let full = r.f32("full_logits_f32").unwrap();
    let vocab = full.shape[1];

    let mut cache = KvCache::new(model.num_layers());
    let mut last = to_vec(model.forward(&input, &mut cache, false));
    let mut out = Vec::new();
    for step in 0..greedy.len() {
        // Row p of full_logits is what the model must produce after position p.
        let p = input.len() - 1 + step;
        let expected = &full.data[p * vocab..(p + 1) * vocab];
        let err = rel_l2(&last, expected);
        assert!(err < 1e-4, "decode step {step}: rel L2 {err}");
        let next = argmax(&last);
        out.push(next);
        last = to_vec(model.forward(&[next], &mut cache, false));
    }
    assert_eq!(out, greedy);
}
