//! Llama against the reference fixtures: HF transformers' fp32 forward of the same weights, and
//! of bitsandbytes' own NF4 dequantization (tests/fixtures/README.md).

use llama_backend::Llama;
use llm_core::testing::{
    assert_tiny_batch_equals_alone, fixtures, greedy, kv_decode_error, load_cpu,
    prompt_logits_error, TinyReference,
};
use llm_core::weights::Quantization;

#[test]
fn tiny_llama_f32_logits_greedy_and_kv_decode_match_hf() {
    let model = load_cpu::<Llama>(&fixtures().join("tiny/llama/bf16"), Quantization::None);
    let r = TinyReference::open("llama");
    let err = prompt_logits_error(&model, &r, "logits_f32");
    assert!(err < 1e-4, "prompt logits rel L2 {err}");
    let want = r.ids("greedy_f32");
    assert_eq!(greedy(&model, &r.ids("input_ids"), want.len()), want);
    let err = kv_decode_error(&model, &r);
    assert!(err < 1e-4, "KV-cache decode rel L2 {err}");
}

#[test]
fn tiny_llama_nf4_quantized_on_load_and_prequantized_match_bnb() {
    let r = TinyReference::open("llama");
    let want = r.ids("greedy_nf4_f32");
    for dir in ["bf16", "nf4"] {
        let model = load_cpu::<Llama>(&fixtures().join("tiny/llama").join(dir), Quantization::Nf4);
        let err = prompt_logits_error(&model, &r, "logits_nf4_f32");
        assert!(err < 1e-4, "{dir}: NF4 prompt logits rel L2 {err}");
        assert_eq!(
            greedy(&model, &r.ids("input_ids"), want.len()),
            want,
            "{dir}"
        );
    }
}

#[test]
fn nf4_linears_hold_what_the_bnb_checkpoint_stores() {
    use llm_core::formats::{SafetensorsDir, TensorStore};
    use llm_core::CausalLm;
    let model = load_cpu::<Llama>(&fixtures().join("tiny/llama/bf16"), Quantization::Nf4);
    let file = SafetensorsDir::open(&fixtures().join("tiny/llama/nf4")).unwrap();
    let mut quantized = 0;
    for (name, linear) in model.linears() {
        let key = format!("{name}.weight");
        match linear.nf4_bytes() {
            Some(bytes) => {
                quantized += 1;
                let on_disk: usize = [
                    "",
                    ".absmax",
                    ".quant_map",
                    ".nested_absmax",
                    ".nested_quant_map",
                ]
                .iter()
                .map(|s| file.raw(&format!("{key}{s}")).unwrap().data.len())
                .sum();
                assert_eq!(bytes, on_disk, "{name}");
                // 0.5 byte per weight (+ absmax): PyTorch counts a 4-bit weight as n/2 elements.
                let n = linear.out_features() * linear.in_features();
                assert_eq!(linear.num_params(), n / 2);
            }
            // lm_head stays float, as bnb leaves it.
            None => assert_eq!(name, "lm_head"),
        }
    }
    assert_eq!(quantized, 14);
}

#[test]
fn tiny_llama_batched_forward_equals_each_sequence_alone() {
    assert_tiny_batch_equals_alone::<Llama>("llama");
}
