//! Qwen2 against HF transformers (tests/fixtures/tiny/qwen2): f32 and NF4.

use llm_core::testing::{
    assert_tiny_batch_equals_alone, fixtures, greedy, kv_decode_error, load_cpu,
    prompt_logits_error, TinyReference,
};
use llm_core::weights::Quantization;
use qwen2_backend::Qwen2;

#[test]
fn tiny_qwen2_f32_logits_greedy_and_kv_decode_match_hf() {
    let model = load_cpu::<Qwen2>(&fixtures().join("tiny/qwen2/bf16"), Quantization::None);
    let r = TinyReference::open("qwen2");
    let err = prompt_logits_error(&model, &r, "logits_f32");
    assert!(err < 1e-4, "prompt logits rel L2 {err}");
    let want = r.ids("greedy_f32");
    assert_eq!(greedy(&model, &r.ids("input_ids"), want.len()), want);
    let err = kv_decode_error(&model, &r);
    assert!(err < 1e-4, "KV-cache decode rel L2 {err}");
}

#[test]
fn tiny_qwen2_nf4_matches_bnb() {
    let r = TinyReference::open("qwen2");
    let want = r.ids("greedy_nf4_f32");
    for dir in ["bf16", "nf4"] {
        let model = load_cpu::<Qwen2>(&fixtures().join("tiny/qwen2").join(dir), Quantization::Nf4);
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
fn tiny_qwen2_batched_forward_equals_each_sequence_alone() {
    assert_tiny_batch_equals_alone::<Qwen2>("qwen2");
}
