//! The default model end to end: real server binary, real llama plugin (libloading), the llm
//! CLI, grpcurl and a Rust gRPC client, against HF transformers' greedy reference.

use std::process::Command;
use std::time::{Duration, Instant};

use llm_e2e::*;
use llm_proto::v1::{
    generate_request, Chat, ChatMessage, FinishReason, GenerateRequest, GenerationParams,
};
use tokio_stream::StreamExt;

fn seed_chat(max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model: "smol".into(),
        input: Some(generate_request::Input::Chat(Chat {
            messages: vec![
                ChatMessage {
                    role: "system".into(),
                    content: SEED_SYSTEM.into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: SEED_USER.into(),
                },
            ],
            fold_system_prompt: false,
        })),
        params: Some(GenerationParams {
            max_new_tokens: Some(max_new_tokens),
            ..Default::default()
        }),
    }
}

async fn smol_server() -> Server {
    let model = default_model();
    let server = Server::start(&["--load", &format!("smol={}", model.display())]);
    server
        .wait_models(&["smol"], Duration::from_secs(120))
        .await;
    server
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_chat_streams_the_reference_greedy_answer() {
    let reference = smollm2_reference();
    let server = smol_server().await;

    // Rust client: tokens arrive one by one, before the stream ends.
    let mut client = server.client().await;
    let mut stream = client
        .generate(seed_chat(80))
        .await
        .expect("generate")
        .into_inner();
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut arrivals = Vec::new();
    let mut done = None;
    while let Some(msg) = stream.next().await {
        let msg = msg.expect("stream message");
        arrivals.push(Instant::now());
        text.push_str(&msg.text);
        ids.extend(msg.token_id);
        if msg.done.is_some() {
            done = msg.done;
        }
    }
    let done = done.expect("final message carries done");
    assert_eq!(ids, ids_of(&reference["greedy_ids"]), "greedy ids");
    assert_eq!(text, reference["greedy_text"].as_str().unwrap());
    assert_eq!(done.finish_reason, FinishReason::Eos as i32);
    assert_eq!(
        done.prompt_tokens as usize,
        ids_of(&reference["prompt_ids"]).len()
    );
    assert_eq!(done.completion_tokens as usize, ids.len());
    assert!(done.time_to_first_token_ms > 0.0 && done.decode_tokens_per_second > 0.0);
    // Streaming, not one batch at the end: the first chunk came well before the last.
    assert!(arrivals.len() > 2, "{} messages", arrivals.len());
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread > Duration::from_millis(50),
        "all chunks arrived within {spread:?}"
    );

    // The CLI prints the same text.
    let out = server.llm(&[
        "generate",
        "--model",
        "smol",
        "--system",
        SEED_SYSTEM,
        "--user",
        SEED_USER,
        "--max-new-tokens",
        "80",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", reference["greedy_text"].as_str().unwrap())
    );

    // --prompt-ids + --ids reproduce the reference ids from the rendered prompt's ids.
    let prompt: Vec<String> = ids_of(&reference["prompt_ids"])
        .iter()
        .map(u32::to_string)
        .collect();
    let out = server.llm(&[
        "generate",
        "--model",
        "smol",
        "--prompt-ids",
        &prompt.join(","),
        "--ids",
        "--max-new-tokens",
        "80",
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
    assert_eq!(got, ids_of(&reference["greedy_ids"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_sees_reflection_and_health() {
    let server = smol_server().await;
    let grpcurl = python_env().join("bin/grpcurl");
    let run = |args: &[&str]| {
        let out = Command::new(&grpcurl)
            .arg("-plaintext")
            .args(args)
            .output()
            .expect("grpcurl");
        assert!(
            out.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let services = run(&[&server.addr, "list"]);
    assert!(
        services.lines().any(|l| l == "llm.v1.LlmService"),
        "{services}"
    );
    assert!(
        services.lines().any(|l| l == "grpc.health.v1.Health"),
        "{services}"
    );
    let methods = run(&[&server.addr, "list", "llm.v1.LlmService"]);
    for m in ["Generate", "ListModels", "LoadModel", "UnloadModel"] {
        assert!(
            methods.contains(&format!("llm.v1.LlmService.{m}")),
            "{methods}"
        );
    }
    let health = run(&[&server.addr, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("\"SERVING\""), "{health}");
    let health = run(&[
        "-d",
        r#"{"service":"llm.v1.LlmService/smol"}"#,
        &server.addr,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(health.contains("\"SERVING\""), "{health}");
    // A generation through reflection alone (no .proto given to grpcurl).
    let out = run(&[
        "-d",
        r#"{"model":"smol","prompt_ids":{"ids":[1,4093,198]},"params":{"max_new_tokens":3,"ignore_eos":true}}"#,
        &server.addr,
        "llm.v1.LlmService/Generate",
    ]);
    assert_eq!(out.matches("\"tokenId\"").count(), 3, "{out}");
    assert!(out.contains("FINISH_REASON_LENGTH"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_not_serving_without_models_and_seeded_sampling_repeats() {
    let server = Server::start(&[]);
    let grpcurl = python_env().join("bin/grpcurl");
    let out = Command::new(&grpcurl)
        .args(["-plaintext", &server.addr, "grpc.health.v1.Health/Check"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NOT_SERVING"), "{text}");

    // Load through the CLI, sample with a seed twice: same tokens; another seed: different.
    let model = default_model();
    let out = server.llm(&["load", "smol", model.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sample = |seed: &str| {
        let out = server.llm(&[
            "generate",
            "--model",
            "smol",
            "--prompt",
            "Once upon a time",
            "--temperature",
            "1.0",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--repetition-penalty",
            "1.1",
            "--seed",
            seed,
            "--max-new-tokens",
            "24",
            "--ids",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let a = sample("7");
    assert_eq!(a, sample("7"));
    assert_ne!(a, sample("8"));
    let out = server.llm(&["models"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("smol"));
    let out = server.llm(&["unload", "smol"]);
    assert!(out.status.success());
    let out = server.llm(&["generate", "--model", "smol", "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NotFound"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
