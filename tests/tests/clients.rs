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

/// Every architecture's tiny fixture through the real server, plugin and CLI: load (float and
/// the bitsandbytes NF4 checkpoint), generate the reference greedy ids from `--prompt-ids`,
/// unload.
#[tokio::test(flavor = "multi_thread")]
async fn tiny_models_of_all_five_architectures_load_generate_unload_via_cli() {
    let server = Server::start(&[]);
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for arch in ["llama", "phi3", "gemma2", "qwen2", "mixtral"] {
        let fixture = |d: &str| {
            fixtures()
                .join("tiny")
                .join(arch)
                .join(d)
                .display()
                .to_string()
        };
        let float = format!("tiny-{arch}");
        let nf4 = format!("tiny-{arch}-nf4");
        ok(server.llm(&["load", &float, &fixture("bf16"), "--quantization", "none"]));
        // The bitsandbytes checkpoint, kept NF4 (quantization auto).
        ok(server.llm(&["load", &nf4, &fixture("nf4")]));

        let refs = std::fs::read(
            fixtures()
                .join("tiny")
                .join(arch)
                .join("reference.safetensors"),
        )
        .unwrap();
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
        let generate = |model: &str, n: usize| -> Vec<u32> {
            ok(server.llm(&[
                "generate",
                "--model",
                model,
                "--prompt-ids",
                &input.join(","),
                "--ids",
                "--ignore-eos",
                "--max-new-tokens",
                &n.to_string(),
            ]))
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect()
        };
        let greedy = ints("greedy_f32");
        assert_eq!(generate(&float, greedy.len()), greedy, "{arch}");
        let greedy_nf4 = ints("greedy_nf4_f32");
        assert_eq!(generate(&nf4, greedy_nf4.len()), greedy_nf4, "{arch} nf4");

        let listing = ok(server.llm(&["models"]));
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(&format!("{float} ")) && l.contains(" none ")),
            "{listing}"
        );
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(&format!("{nf4} ")) && l.contains(" nf4 ")),
            "{listing}"
        );
        ok(server.llm(&["unload", &float]));
        ok(server.llm(&["unload", &nf4]));
        let listing = ok(server.llm(&["models"]));
        assert!(!listing.contains(&float), "{listing}");
    }
    // Text input needs a tokenizer these directories do not have: a clear error.
    ok(server.llm(&[
        "load",
        "t",
        &fixtures().join("tiny/llama/bf16").display().to_string(),
    ]));
    let out = server.llm(&["generate", "--model", "t", "--prompt", "hello"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenizer"));
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_v1_and_v1alpha_list_the_services() {
    use tonic_reflection::pb::{v1, v1alpha};
    let server = Server::start(&[]);
    // v1 (grpcurl >= 1.9, ghz, Postman) ...
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut s = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = s.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("unexpected v1 reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"llm.v1.LlmService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    // ... and v1alpha (grpcurl 1.8, tested with the real grpcurl in smollm2_e2e).
    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "llm.v1.LlmService".into(),
            ),
        ),
    };
    let mut s = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = s.message().await.unwrap().unwrap();
    assert!(matches!(
        resp.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
}
