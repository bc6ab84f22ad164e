//! `llm bench`: a load generator over the real gRPC API. Reports what ghz reports (count, rps,
//! latency distribution, count per status code) and what ghz cannot see in a stream: time to
//! first token, inter-token latency and aggregate tokens/s.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use llm_proto::v1::{
    generate_request, Chat, ChatMessage, GenerateRequest, GenerationParams, ListModelsRequest,
    TokenIds,
};
use tokio_stream::StreamExt;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model name (see `llm models`).
    #[arg(long)]
    model: String,
    /// Requests in flight at once.
    #[arg(long, short = 'c', default_value_t = 1)]
    concurrency: usize,
    /// Total requests to send.
    #[arg(long, short = 'n', conflicts_with = "duration")]
    requests: Option<usize>,
    /// Send requests for this many seconds instead (requests started in time finish).
    #[arg(long, short = 'z')]
    duration: Option<f64>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: u32,
    /// Prompt: sent as a user chat message when the model has a chat template, else as raw text.
    #[arg(
        long,
        default_value = "Write a short story about a robot who learns to paint."
    )]
    prompt: String,
    /// Prompt token ids instead of text (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    prompt_ids: Option<Vec<u32>>,
    /// Generate the full max_new_tokens, past end-of-sequence tokens (fixed output lengths).
    #[arg(long)]
    ignore_eos: bool,
    /// Per-request deadline in seconds (grpc-timeout); 0 = none.
    #[arg(long, default_value_t = 0.0)]
    timeout: f64,
    /// A status that is expected and does not fail the run, e.g. ResourceExhausted (repeatable).
    #[arg(long = "allow-status")]
    allow_status: Vec<String>,
    /// Requests sent first, at the same concurrency, and left out of the report (first-use
    /// kernel compilation and autotuning on GPU servers).
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default)]
struct Sample {
    code: String,
    latency: f64,
    ttft: Option<f64>,
    gaps: Vec<f64>,
    tokens: u64,
}

/// Percentile of sorted data (nearest rank).
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn dist(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    let ms = |x: f64| (x * 1e6).round() / 1e3;
    serde_json::json!({
        "min_ms": ms(v.first().copied().unwrap_or(0.0)),
        "mean_ms": ms(mean),
        "p50_ms": ms(pct(&v, 50.0)),
        "p90_ms": ms(pct(&v, 90.0)),
        "p99_ms": ms(pct(&v, 99.0)),
        "max_ms": ms(v.last().copied().unwrap_or(0.0)),
    })
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

pub async fn run(url: &str, a: BenchArgs) -> Result<bool> {
    if a.requests.is_none() && a.duration.is_none() {
        bail!("give --requests N or --duration SECS");
    }
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let mut client = crate::connect(url).await?;
    let models = client
        .list_models(ListModelsRequest {})
        .await
        .map_err(crate::status_error)?
        .into_inner()
        .models;
    let Some(info) = models.iter().find(|m| m.name == a.model) else {
        bail!("model `{}` is not loaded (see `llm models`)", a.model);
    };
    let input = if let Some(ids) = &a.prompt_ids {
        generate_request::Input::PromptIds(TokenIds { ids: ids.clone() })
    } else if info.has_chat_template {
        generate_request::Input::Chat(Chat {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: a.prompt.clone(),
            }],
            fold_system_prompt: false,
        })
    } else {
        generate_request::Input::Prompt(a.prompt.clone())
    };
    let req = GenerateRequest {
        model: a.model.clone(),
        input: Some(input),
        params: Some(GenerationParams {
            max_new_tokens: Some(a.max_new_tokens),
            ignore_eos: a.ignore_eos,
            ..Default::default()
        }),
    };

    let timeout = (a.timeout > 0.0).then(|| Duration::from_secs_f64(a.timeout));
    if a.warmup > 0 {
        // First-use costs (kernel compilation, autotuning of new batch shapes) stay out of the
        // figures: these requests run at the same concurrency and are not reported.
        drive(url, &req, a.concurrency, Some(a.warmup), None, timeout).await?;
    }
    let stop_at = a
        .duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d));
    let t0 = Instant::now();
    let samples = drive(url, &req, a.concurrency, a.requests, stop_at, timeout).await?;
    let wall = t0.elapsed().as_secs_f64();

    let mut codes = BTreeMap::<String, usize>::new();
    for s in &samples {
        *codes.entry(s.code.clone()).or_default() += 1;
    }
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.code == "Ok").collect();
    let tokens: u64 = samples.iter().map(|s| s.tokens).sum();
    let report = serde_json::json!({
        "model": a.model,
        "concurrency": a.concurrency,
        "count": samples.len(),
        "total_s": (wall * 1e3).round() / 1e3,
        "rps": samples.len() as f64 / wall,
        "latency": dist(ok.iter().map(|s| s.latency).collect()),
        "status_codes": codes,
        "ttft": dist(ok.iter().filter_map(|s| s.ttft).collect()),
        "inter_token_latency": dist(ok.iter().flat_map(|s| s.gaps.iter().copied()).collect()),
        "completion_tokens": tokens,
        "tokens_per_second": tokens as f64 / wall,
    });
    if a.json {
        println!("{report}");
    } else {
        print_report(&report);
    }
    let allowed = |c: &str| {
        c == "Ok"
            || a.allow_status
                .iter()
                .any(|x| x.eq_ignore_ascii_case(c) || x.replace('_', "").eq_ignore_ascii_case(c))
    };
    Ok(codes.keys().all(|c| allowed(c)))
}

/// `concurrency` workers, each on its own connection, sending `req` until `requests` have been
/// sent or `stop_at` has passed (requests started in time finish). One sample per request.
async fn drive(
    url: &str,
    req: &GenerateRequest,
    concurrency: usize,
    requests: Option<usize>,
    stop_at: Option<Instant>,
    timeout: Option<Duration>,
) -> Result<Vec<Sample>> {
    let remaining = Arc::new(AtomicUsize::new(requests.unwrap_or(usize::MAX)));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        // One connection per worker, as independent clients would have.
        let mut client = crate::connect(url).await?;
        let (req, remaining, samples) = (req.clone(), remaining.clone(), samples.clone());
        workers.push(tokio::spawn(async move {
            loop {
                if stop_at.is_some_and(|s| Instant::now() >= s) {
                    break;
                }
                if remaining
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_err()
                {
                    break;
                }
                let start = Instant::now();
                let mut s = Sample::default();
                let mut request = tonic::Request::new(req.clone());
                if let Some(t) = timeout {
                    request.set_timeout(t);
                }
                let mut last = start;
                let code = match client.generate(request).await {
                    Err(status) => status.code(),
                    Ok(resp) => {
                        let mut stream = resp.into_inner();
                        let mut code = tonic::Code::Unknown;
                        while let Some(msg) = stream.next().await {
                            match msg {
                                Err(status) => {
                                    code = status.code();
                                    break;
                                }
                                Ok(msg) => {
                                    if msg.token_id.is_some() {
                                        let now = Instant::now();
                                        match s.ttft {
                                            None => s.ttft = Some((now - start).as_secs_f64()),
                                            Some(_) => s.gaps.push((now - last).as_secs_f64()),
                                        }
                                        last = now;
                                        s.tokens += 1;
                                    }
                                    if msg.done.is_some() {
                                        code = tonic::Code::Ok;
                                    }
                                }
                            }
                        }
                        code
                    }
                };
                s.code = code_name(code);
                s.latency = start.elapsed().as_secs_f64();
                samples.lock().expect("samples").push(s);
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let samples = std::mem::take(&mut *samples.lock().expect("samples"));
    Ok(samples)
}

fn print_report(r: &serde_json::Value) {
    println!("Summary:");
    println!("  Count:        {}", r["count"]);
    println!(
        "  Total:        {:.2} s",
        r["total_s"].as_f64().unwrap_or(0.0)
    );
    println!("  Requests/sec: {:.2}", r["rps"].as_f64().unwrap_or(0.0));
    println!(
        "  Tokens/sec:   {:.1} ({} tokens)",
        r["tokens_per_second"].as_f64().unwrap_or(0.0),
        r["completion_tokens"]
    );
    for (title, key) in [
        ("Latency (OK requests)", "latency"),
        ("Time to first token", "ttft"),
        ("Inter-token latency", "inter_token_latency"),
    ] {
        let d = &r[key];
        println!(
            "{title}:\n  min {} ms, mean {} ms, p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            d["min_ms"], d["mean_ms"], d["p50_ms"], d["p90_ms"], d["p99_ms"], d["max_ms"]
        );
    }
    println!("Status code distribution:");
    if let Some(codes) = r["status_codes"].as_object() {
        for (c, n) in codes {
            println!("  [{c}] {n} responses");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 50.0), 50.0);
        assert_eq!(pct(&v, 90.0), 90.0);
        assert_eq!(pct(&v, 99.0), 99.0);
        assert_eq!(pct(&v, 100.0), 100.0);
        assert_eq!(pct(&[3.0], 99.0), 3.0);
    }
}
