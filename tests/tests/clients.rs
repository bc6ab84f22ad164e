//! Other clients and models through the real server: the Python grpcio example client, and the
//! tiny Llama fixture (an HF directory without tokenizer) driven by token ids from the CLI.

use std::process::Command;
use std::time::Duration;

use llm_e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_client_streams_the_seed_chat() {
    let model = default_model();
    let server = Server::start(&["--load", &format!("smol={}", model.display())]);
    server
        .wait_models(&["smol"], Duration::from_secs(120))
        .await;
    let python = python_env().join("bin/python");
    let out = Command::new(python)
        .arg(repo_root().join("examples/python/chat_client.py"))
        .args([
            "--server",
            &server.addr,
            "--model",
            "smol",
            "--system",
            SEED_SYSTEM,
            "--user",
            SEED_USER,
        ])
        .args(["--max-new-tokens", "80", "--stats"])
        .output()
        .expect("python client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = smollm2_reference();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", reference["greedy_text"].as_str().unwrap())
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("FINISH_REASON_EOS"));
}

#[tokio::test(flavor = "multi_thread")]
async fn tiny_llama_loads_generates_reference_ids_and_unloads_via_cli() {
    let server = Server::start(&[]);
    let dir = fixtures().join("tiny/llama/bf16");
    let out = server.llm(&["load", "tiny", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The reference prompt and greedy continuation, read from the fixture with the formats crate.
    let refs = std::fs::read(fixtures().join("tiny/llama/reference.safetensors")).unwrap();
    let ints = |name: &str| -> Vec<u32> {
        let n = u64::from_le_bytes(refs[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&refs[8..8 + n]).unwrap();
        let off = &header[name]["data_offsets"];
        let (a, b) = (
            off[0].as_u64().unwrap() as usize,
            off[1].as_u64().unwrap() as usize,
        );
        refs[8 + n + a..8 + n + b]
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    };
    let input: Vec<String> = ints("input_ids").iter().map(u32::to_string).collect();
    let greedy = ints("greedy_f32");
    let out = server.llm(&[
        "generate",
        "--model",
        "tiny",
        "--prompt-ids",
        &input.join(","),
        "--ids",
        "--max-new-tokens",
        &greedy.len().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<u32> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(got, greedy);

    // Text input needs a tokenizer this directory does not have: a clear error.
    let out = server.llm(&["generate", "--model", "tiny", "--prompt", "hello"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenizer"));

    let out = server.llm(&["models"]);
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listing.contains("tiny") && listing.contains("llama"),
        "{listing}"
    );
    let out = server.llm(&["unload", "tiny"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.llm(&["models"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("tiny"));
}
