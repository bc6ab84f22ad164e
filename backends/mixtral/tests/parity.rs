//! Mixtral against HF transformers (tests/fixtures/tiny/mixtral): f32 and NF4.

use llm_core::testing::{
    assert_tiny_batch_equals_alone, fixtures, greedy, kv_decode_error, load_cpu,
    prompt_logits_error, TinyReference,
};
use llm_core::weights::Quantization;
use mixtral_backend::Mixtral;

#[test]
fn tiny_mixtral_f32_logits_greedy_and_kv_decode_match_hf() {
    let model = load_cpu::<Mixtral>(&fixtures().join("tiny/mixtral/bf16"), Quantization::None);
    let r = TinyReference::open("mixtral");
    let err = prompt_logits_error(&model, &r, "logits_f32");
    assert!(err < 1e-4, "prompt logits rel L2 {err}");
    let want = r.ids("greedy_f32");
    assert_eq!(greedy(&model, &r.ids("input_ids"), want.len()), want);
    let err = kv_decode_error(&model, &r);
    assert!(err < 1e-4, "KV-cache decode rel L2 {err}");
}

#[test]
fn tiny_mixtral_nf4_matches_bnb() {
    let r = TinyReference::open("mixtral");
    let want = r.ids("greedy_nf4_f32");
    for dir in ["bf16", "nf4"] {
        let model = load_cpu::<Mixtral>(
            &fixtures().join("tiny/mixtral").join(dir),
            Quantization::Nf4,
        );
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
fn tiny_mixtral_batched_forward_equals_each_sequence_alone() {
    assert_tiny_batch_equals_alone::<Mixtral>("mixtral");
}
