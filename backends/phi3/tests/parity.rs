//! Phi3 against HF transformers (tests/fixtures/tiny/phi3): f32 and NF4.

use llm_core::testing::{
    assert_tiny_batch_equals_alone, fixtures, greedy, kv_decode_error, load_cpu,
    prompt_logits_error, TinyReference,
};
use llm_core::weights::Quantization;
use phi3_backend::Phi3;

#[test]
fn tiny_phi3_f32_logits_greedy_and_kv_decode_match_hf() {
    let model = load_cpu::<Phi3>(&fixtures().join("tiny/phi3/bf16"), Quantization::None);
    let r = TinyReference::open("phi3");
    let err = prompt_logits_error(&model, &r, "logits_f32");
    assert!(err < 1e-4, "prompt logits rel L2 {err}");
    let want = r.ids("greedy_f32");
    assert_eq!(greedy(&model, &r.ids("input_ids"), want.len()), want);
    let err = kv_decode_error(&model, &r);
    assert!(err < 1e-4, "KV-cache decode rel L2 {err}");
}

#[test]
fn tiny_phi3_nf4_matches_bnb() {
    let r = TinyReference::open("phi3");
    let want = r.ids("greedy_nf4_f32");
    for dir in ["bf16", "nf4"] {
        let model = load_cpu::<Phi3>(&fixtures().join("tiny/phi3").join(dir), Quantization::Nf4);
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
fn tiny_phi3_batched_forward_equals_each_sequence_alone() {
    assert_tiny_batch_equals_alone::<Phi3>("phi3");
}
