//! The default model, SmolLM2-135M-Instruct as a Q4_1 GGUF, against HF transformers' forward of
//! the same GGUF dequantized to fp32, plain and with every linear NF4-quantized by bitsandbytes
//! (tests/fixtures/smollm2).

use llama_backend::Llama;
use llm_core::formats::{SafetensorsDir, TensorStore};
use llm_core::testing::{default_model, fixtures, greedy, load_cpu, rel_l2, to_vec};
use llm_core::weights::Quantization;
use llm_core::{CausalLm, KvCache};

fn reference() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("smollm2/reference.json")).unwrap())
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn last_logits_error<M: CausalLm<llm_core::Cpu>>(model: &M, prompt: &[u32], key: &str) -> f64 {
    let mut cache = KvCache::new(model.num_layers());
    let last = to_vec(model.forward(prompt, &mut cache, false));
    let expected = SafetensorsDir::open_file(&fixtures().join("smollm2/reference.safetensors"))
        .unwrap()
        .f32(key)
        .unwrap();
    rel_l2(&last, &expected.data)
}

#[test]
fn smollm2_gguf_logits_and_greedy_match_hf() {
    let model = load_cpu::<Llama>(&default_model(), Quantization::None);
    let r = reference();
    let prompt = ids(&r["prompt_ids"]);
    let err = last_logits_error(&model, &prompt, "prompt_last_logits_f32");
    assert!(err < 1e-3, "last-position logits rel L2 {err}");
    // HF stops at EOS (2), the last reference id.
    let want = ids(&r["greedy_ids"]);
    assert_eq!(greedy(&model, &prompt, want.len()), want);
}

#[test]
fn smollm2_gguf_nf4_logits_and_greedy_match_bnb() {
    let model = load_cpu::<Llama>(&default_model(), Quantization::Nf4);
    let r = reference();
    let prompt = ids(&r["prompt_ids"]);
    let err = last_logits_error(&model, &prompt, "nf4_prompt_last_logits_f32");
    assert!(err < 1e-3, "NF4 last-position logits rel L2 {err}");
    let want = ids(&r["nf4_greedy_ids"]);
    assert_eq!(want.len(), 80);
    assert_eq!(greedy(&model, &prompt, want.len()), want);
}
