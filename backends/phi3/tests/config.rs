//! The hub's config.json of the real model parses: every field it has is used or explicitly
//! known to be inert (tests/fixtures/configs).

#[test]
fn real_phi3_config_parses_strictly() {
    let path = llm_core::testing::fixtures().join("configs/phi-3-mini-4k-instruct/config.json");
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let c: phi3_backend::Phi3Config =
        llm_core::parse_config(&value, &path.display().to_string()).unwrap();
    assert_eq!(c.model_type, "phi3");
    // An unknown field is rejected by name.
    let mut bad = value.clone();
    bad["made_up_field"] = serde_json::json!(1);
    let err = llm_core::parse_config::<phi3_backend::Phi3Config>(&bad, "config.json").unwrap_err();
    assert!(err.message.contains("made_up_field"), "{}", err.message);
}
