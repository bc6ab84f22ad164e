//! Gemma2 against HF transformers (tests/fixtures/tiny/gemma2): f32 and NF4.

use gemma2_backend::Gemma2;
use llm_core::testing::{
    assert_tiny_batch_equals_alone, fixtures, greedy, kv_decode_error, load_cpu,
    prompt_logits_error, TinyReference,
};
use llm_core::weights::Quantization;

#[test]
fn tiny_gemma2_f32_logits_greedy_and_kv_decode_match_hf() {
    let model = load_cpu::<Gemma2>(&fixtures().join("tiny/gemma2/bf16"), Quantization::None);
    let r = TinyReference::open("gemma2");
    let err = prompt_logits_error(&model, &r, "logits_f32");
    assert!(err < 1e-4, "prompt logits rel L2 {err}");
    let want = r.ids("greedy_f32");
    assert_eq!(greedy(&model, &r.ids("input_ids"), want.len()), want);
    let err = kv_decode_error(&model, &r);
    assert!(err < 1e-4, "KV-cache decode rel L2 {err}");
}

#[test]
fn tiny_gemma2_nf4_matches_bnb() {
    let r = TinyReference::open("gemma2");
    let want = r.ids("greedy_nf4_f32");
    for dir in ["bf16", "nf4"] {
        let model =
            load_cpu::<Gemma2>(&fixtures().join("tiny/gemma2").join(dir), Quantization::Nf4);
        let err = prompt_logits_error(&model, &r, "logits_nf4_f32");
        assert!(err < 1e-4, "{dir}: NF4 prompt logits rel L2 {err}");
        assert_eq!(
            greedy(&model, &r.ids("input_ids"), want.len()),
            want,
            "{dir}"
        );
    }
}

/// The sliding window is really exercised: the fixture prompt (24) is longer than the window (8),
/// and the same weights with full attention everywhere give different logits.
#[test]
fn tiny_gemma2_sliding_window_matters() {
    let src = fixtures().join("tiny/gemma2/bf16");
    let dir = std::env::temp_dir().join(format!("gemma2-nowindow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.safetensors", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["sliding_window"], 8);
    let r = TinyReference::open("gemma2");
    assert!(r.ids("input_ids").len() > 8);
    cfg["layer_types"] = serde_json::json!(["full_attention", "full_attention", "full_attention"]);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let model = load_cpu::<Gemma2>(&dir, Quantization::None);
    let err = prompt_logits_error(&model, &r, "logits_f32");
    assert!(
        err > 1e-3,
        "full attention reproduced the sliding-window logits (rel L2 {err})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tiny_gemma2_batched_forward_equals_each_sequence_alone() {
    assert_tiny_batch_equals_alone::<Gemma2>("gemma2");
}
