//! Serving under load through the real server binary: batching changes no result, a bounded
//! queue refuses overload at once, cancelled and expired streams free their slot, malformed and
//! oversized messages get clear statuses, admin RPCs need the token and stay inside the model
//! roots, SIGTERM drains in-flight streams.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llm_e2e::*;
use llm_proto::v1::{generate_request, GenerateRequest, GenerationParams, TokenIds};
use tokio_stream::StreamExt;
use tonic::Code;

fn ids_request(model: &str, ids: Vec<u32>, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        input: Some(generate_request::Input::PromptIds(TokenIds { ids })),
        params: Some(GenerationParams {
            max_new_tokens: Some(max_new_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
    }
}

fn text_request(model: &str, prompt: &str, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        input: Some(generate_request::Input::Prompt(prompt.into())),
        params: Some(GenerationParams {
            max_new_tokens: Some(max_new_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
    }
}

/// Run a request to the end: its token ids, or the status it failed with.
async fn run(server: &Server, req: GenerateRequest) -> Result<Vec<u32>, tonic::Status> {
    run_at(server.url(), req).await
}

fn smol_server(extra: &[&str]) -> Server {
    let model = default_model();
    let load = format!("smol={}", model.display());
    let mut args = vec!["--load", &load, "--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Run tests/python/stream_tools.py (a grpcio client) and parse the JSON it prints.
fn stream_tools(args: &[&str]) -> serde_json::Value {
    let out = Command::new(python_env().join("bin/python"))
        .arg(repo_root().join("tests/python/stream_tools.py"))
        .args(args)
        .output()
        .unwrap();
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn wait_until(what: &str, server: &Server, cond: impl Fn(&Server) -> bool) {
    let t0 = Instant::now();
    while !cond(server) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}:\n{}",
            server.metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn batching_changes_no_result() {
    // 32 different prompts, batch of 8 with a small prefill chunk: sequences join and leave the
    // batch mid-prompt and mid-generation. A step budget of 13 rows cuts prompt chunks short
    // and makes some prompts wait a step while others decode.
    let server = smol_server(&[
        "--max-batch",
        "8",
        "--prefill-chunk",
        "4",
        "--max-step-tokens",
        "13",
    ]);
    server
        .wait_models(&["smol"], Duration::from_secs(120))
        .await;
    let prompts: Vec<String> = (0..32)
        .map(|i| format!("Question {i}: what is {i} plus {}? Answer:", i * 7 % 13))
        .collect();
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(run(&server, text_request("smol", p, 12)).await.unwrap());
    }
    let together = futures_join(
        prompts
            .iter()
            .map(|p| run_at(server.url(), text_request("smol", p, 12))),
    )
    .await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t.as_ref().unwrap(), "prompt {i}: batched result differs");
    }
    // A stream's request is counted as its handler ends, which can be just after the client
    // saw the end of the stream.
    let ok = r#"llm_requests_total{model="smol",code="OK"}"#;
    wait_until("64 requests counted", &server, |s| s.metric(ok) >= 64.0).await;
    assert_eq!(server.metric(ok), 64.0);
    // The batched run mixed prompt chunks with decode rows, within the budget on average (the
    // per-step bound is `plan_step`'s unit test).
    let mixed = |m: &str| server.metric(&format!(r#"{m}{{model="smol",kind="mixed"}}"#));
    let steps = mixed("llm_step_duration_seconds_count");
    assert!(steps > 0.0, "no step mixed prompts with decodes");
    assert!(mixed("llm_step_rows_total") <= 13.0 * steps);
}

/// Await all futures concurrently (spawned, so they really overlap).
async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_is_refused_at_once_and_nothing_is_lost() {
    let tiny = fixtures().join("tiny/llama/bf16");
    let load = format!("tiny={}", tiny.display());
    let server = Server::start(&[
        "--load",
        &load,
        "--max-batch",
        "2",
        "--max-queue",
        "8",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    server.wait_models(&["tiny"], Duration::from_secs(60)).await;
    let out = Command::new(bin("llm"))
        .args(["--server", &server.url(), "bench", "--model", "tiny"])
        .args(["--concurrency", "200", "--requests", "200"])
        .args(["--prompt-ids", "1,2,3,4,5,6,7,8", "--max-new-tokens", "64"])
        .args([
            "--ignore-eos",
            "--allow-status",
            "ResourceExhausted",
            "--json",
        ])
        .output()
        .expect("llm bench");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes = &report["status_codes"];
    let ok = codes["Ok"].as_u64().unwrap_or(0);
    let refused = codes["ResourceExhausted"].as_u64().unwrap_or(0);
    assert_eq!(report["count"], 200, "{report}");
    assert_eq!(
        ok + refused,
        200,
        "every request completes or is refused: {report}"
    );
    assert!(
        refused > 0,
        "a queue of 8 must refuse some of 200: {report}"
    );
    // The queue's 8 complete at least; up to 2 more when the scheduler moves queued requests
    // into the batch while the burst still arrives (a race: 9 were seen in CI), so not asserted.
    assert!(ok >= 8, "the 8 queued complete at least: {report}");
    assert_eq!(report["completion_tokens"], ok * 64, "{report}");
    // The server counted the same, and still answers.
    assert_eq!(
        server.metric(r#"llm_requests_total{model="tiny",code="RESOURCE_EXHAUSTED"}"#),
        refused as f64
    );
    assert_eq!(
        server.metric(r#"llm_requests_total{model="tiny",code="OK"}"#),
        ok as f64
    );
    assert_eq!(
        server.metric(r#"llm_queue_depth{model="tiny",device="cpu"}"#),
        0.0
    );
    let grpcurl = python_env().join("bin/grpcurl");
    let health = Command::new(&grpcurl)
        .args(["-plaintext", &server.addr, "grpc.health.v1.Health/Check"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&health.stdout).contains("\"SERVING\""));
    // The refusal names the model and the limit.
    let status = {
        let mut held = Vec::new();
        let mut refused = None;
        for _ in 0..20 {
            let mut c = server.client().await;
            match c.generate(ids_request("tiny", vec![1, 2, 3], 400)).await {
                Ok(s) => held.push(s.into_inner()),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        refused.expect("some request refused")
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("tiny") && status.message().contains("--max-queue 8"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_deadline_free_the_slot_and_spare_other_streams() {
    // Batch of 2: one long stream A holds a slot for the whole test; each other stream must free
    // the second slot for the next one to run.
    let server = smol_server(&["--max-batch", "2"]);
    server
        .wait_models(&["smol"], Duration::from_secs(120))
        .await;
    let running = r#"llm_running_batch_size{model="smol",device="cpu"}"#;
    let mut client = server.client().await;
    let mut a = client
        .generate(text_request("smol", "The history of the world", 3000))
        .await
        .unwrap()
        .into_inner();
    let mut a_tokens = 0;
    while a_tokens < 3 {
        a_tokens += a.next().await.unwrap().unwrap().token_id.is_some() as usize;
    }

    // The CLI, interrupted like Ctrl-C.
    let mut cli = Command::new(bin("llm"))
        .args(["--server", &server.url(), "generate", "--model", "smol"])
        .args(["--prompt", "Tell me everything", "--max-new-tokens", "3000"])
        .args(["--ignore-eos", "--ids"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the CLI stream to run", &server, |s| {
        s.metric(running) == 2.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ok = Command::new("kill")
        .args(["-INT", &cli.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let _ = cli.wait().unwrap();
    wait_until("the CLI's slot to be freed", &server, |s| {
        s.metric(running) == 1.0
            && s.metric(r#"llm_requests_total{model="smol",code="CANCELLED"}"#) == 1.0
    })
    .await;

    // The Python client cancels after 5 tokens.
    let r = stream_tools(&["cancel", &server.addr, "smol", "5"]);
    assert_eq!(r["tokens"], 5, "{r}");
    assert_eq!(r["code"], "CANCELLED", "{r}");
    wait_until("the Python client's slot to be freed", &server, |s| {
        s.metric(running) == 1.0
            && s.metric(r#"llm_requests_total{model="smol",code="CANCELLED"}"#) == 2.0
    })
    .await;

    // A 200 ms deadline on a long generation: DEADLINE_EXCEEDED, slot freed.
    let mut req = tonic::Request::new(text_request("smol", "Write a long essay", 3000));
    req.set_timeout(Duration::from_millis(200));
    let t0 = Instant::now();
    let status = async {
        let mut s = server.client().await.generate(req).await?.into_inner();
        while let Some(m) = s.next().await {
            m?;
        }
        Ok::<(), tonic::Status>(())
    }
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    wait_until("the expired request's slot to be freed", &server, |s| {
        s.metric(running) == 1.0
    })
    .await;

    // The slot is free: a new request runs to completion next to A.
    let ids = run(&server, text_request("smol", "Hello", 8))
        .await
        .unwrap();
    assert_eq!(ids.len(), 8);
    // A was never disturbed: it still streams.
    let mut more = 0;
    while more < 10 {
        more += a.next().await.unwrap().unwrap().token_id.is_some() as usize;
    }
    drop(a);
    wait_until("A's slot to be freed", &server, |s| {
        s.metric(running) == 0.0
    })
    .await;
    let metrics = server.metrics();
    assert!(metrics.contains("llm_time_to_first_token_seconds_count{model=\"smol\"}"));
    assert!(metrics.contains("llm_inter_token_latency_seconds_bucket{model=\"smol\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_oversized_messages_get_clear_errors() {
    let tiny = fixtures().join("tiny/llama/bf16");
    let load = format!("tiny={}", tiny.display());
    let server = Server::start(&["--load", &load]);
    server.wait_models(&["tiny"], Duration::from_secs(60)).await;
    let r = stream_tools(&["raw", &server.addr]);
    assert_eq!(r["malformed"]["code"], "INTERNAL", "{r}");
    assert!(
        r["malformed"]["details"]
            .as_str()
            .unwrap()
            .contains("decode"),
        "{r}"
    );
    assert_eq!(r["oversized"]["code"], "OUT_OF_RANGE", "{r}");
    assert!(
        r["oversized"]["details"]
            .as_str()
            .unwrap()
            .contains("too large"),
        "{r}"
    );
    // Still serving.
    let ids = run(&server, ids_request("tiny", vec![1, 2, 3], 4))
        .await
        .unwrap();
    assert_eq!(ids.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_rpcs_need_the_token_and_stay_inside_the_model_roots() {
    let root = fixtures().join("tiny");
    let server = Server::start(&[
        "--admin-token",
        "s3cret",
        "--model-root",
        root.to_str().unwrap(),
    ]);
    let inside = root.join("llama/bf16");
    let inside = inside.to_str().unwrap();
    let out = server.llm(&["load", "t", inside]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Unauthenticated") && err.contains("admin token"),
        "{err}"
    );
    let out = server.llm(&["--admin-token", "wrong", "load", "t", inside]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));

    // `..` that leaves the root, and an absolute path elsewhere.
    let escape = root.join("llama/../../smollm2");
    for outside in [escape.to_str().unwrap(), "/etc"] {
        let out = server.llm(&["--admin-token", "s3cret", "load", "t", outside]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("PermissionDenied") && err.contains("outside the server's model roots"),
            "{err}"
        );
    }
    assert_ok(&server.llm(&["--admin-token", "s3cret", "load", "t", inside]));
    // Unload needs the token too (the environment variable works like the flag).
    let out = server.llm(&["unload", "t"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
    assert_ok(
        &Command::new(bin("llm"))
            .env("LLM_ADMIN_TOKEN", "s3cret")
            .args(["--server", &server.url(), "unload", "t"])
            .output()
            .unwrap(),
    );
    // Generate needs no token.
    let out = server.llm(&["models"]);
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_running_streams_finish() {
    let mut server = smol_server(&["--shutdown-grace", "30"]);
    server
        .wait_models(&["smol"], Duration::from_secs(120))
        .await;
    let mut client = server.client().await;
    let mut s = client
        .generate(text_request("smol", "Once upon a time", 40))
        .await
        .unwrap()
        .into_inner();
    let first = s.next().await.unwrap().unwrap();
    assert!(first.token_id.is_some());
    server.signal("TERM");
    let mut tokens = 1;
    let mut done = None;
    while let Some(m) = s.next().await {
        let m = m.expect("the in-flight stream finishes normally");
        tokens += m.token_id.is_some() as u32;
        if m.done.is_some() {
            done = m.done;
        }
    }
    assert_eq!(tokens, 40);
    assert_eq!(done.unwrap().completion_tokens, 40);
    let status = server.wait_exit(Duration::from_secs(30)).expect("exited");
    assert!(status.success(), "{status:?}\n{}", server.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_warmup_requests_run_but_are_left_out_of_the_report() {
    let tiny = fixtures().join("tiny/llama/bf16");
    let load = format!("tiny={}", tiny.display());
    let server = Server::start(&["--load", &load, "--metrics-listen", "127.0.0.1:0"]);
    server.wait_models(&["tiny"], Duration::from_secs(60)).await;
    let out = Command::new(bin("llm"))
        .args(["--server", &server.url(), "bench", "--model", "tiny"])
        .args(["--concurrency", "2", "--requests", "4", "--warmup", "3"])
        .args([
            "--prompt-ids",
            "1,2,3",
            "--max-new-tokens",
            "5",
            "--ignore-eos",
        ])
        .arg("--json")
        .output()
        .expect("llm bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["count"], 4, "{report}");
    assert_eq!(report["completion_tokens"], 20, "{report}");
    // The server saw all seven.
    assert_eq!(
        server.metric(r#"llm_requests_total{model="tiny",code="OK"}"#),
        7.0
    );
}
