//! The default model, SmolLM2-135M-Instruct as a Q4_1 GGUF, against HF transformers' forward of
//! the same GGUF dequantized to fp32 (tests/fixtures/smollm2).

use llama_backend::LlamaForCausalLM;
use llm_core::formats::{ModelSource, SafetensorsDir, TensorStore};
use llm_core::testing::{default_model, fixtures, rel_l2, to_vec};
use llm_core::weights::Quantization;
use llm_core::{CausalLm, Cpu, KvCache, LoadCtx, LoadOptions};

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

#[test]
fn smollm2_gguf_logits_and_greedy_match_hf() {
    let path = default_model();
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
    let r = reference();
    let prompt = ids(&r["prompt_ids"]);
    let greedy = ids(&r["greedy_ids"]);
    let eos = r["eos_token_id"].as_u64().unwrap() as u32;

    let mut cache = KvCache::new(model.num_layers());
    let mut last = to_vec(model.forward(&prompt, &mut cache, false));
    let expected = SafetensorsDir::open_file(&fixtures().join("smollm2/reference.safetensors"))
        .unwrap()
        .f32("prompt_last_logits_f32")
        .unwrap();
    let err = rel_l2(&last, &expected.data);
    assert!(err < 1e-3, "last-position logits rel L2 {err}");

    let mut out = Vec::new();
    for _ in 0..80 {
        let mut best = 0;
        for (i, &x) in last.iter().enumerate() {
            if x > last[best] {
                best = i;
            }
        }
        out.push(best as u32);
        if best as u32 == eos {
            break;
        }
        last = to_vec(model.forward(&[best as u32], &mut cache, false));
    }
    assert_eq!(out, greedy);
}
