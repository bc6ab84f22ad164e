//! Prometheus metrics: counters and histograms the handlers and schedulers record, gauges read
//! from the loaded models at scrape time, served as text on `--metrics-listen` (GET /metrics).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Live figures of one model's scheduler (gauges).
#[derive(Debug, Default)]
pub struct ModelStats {
    /// Requests accepted and not yet running (in the channel or the wait queue).
    pub queued: AtomicUsize,
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Bytes the running sequences' KV cache holds (refreshed by the scheduler between steps).
    pub kv_cache_bytes: std::sync::atomic::AtomicU64,
    /// Device pool bytes beyond weights and KV cache (0 on the CPU).
    pub workspace_bytes: std::sync::atomic::AtomicU64,
}

/// Histogram buckets (upper bounds, seconds).
const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const STEP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// What a scheduler step fed the model: every sequence one decode token, only prompt chunks,
/// or both (a newcomer's prompt joining the others' decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StepKind {
    Decode,
    Prefill,
    Mixed,
}

impl StepKind {
    fn name(self) -> &'static str {
        match self {
            StepKind::Decode => "decode",
            StepKind::Prefill => "prefill",
            StepKind::Mixed => "mixed",
        }
    }
}

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }
    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
    /// The series under `labels` (e.g. `model="a"`).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    /// (model, gRPC code name) -> finished requests.
    requests: BTreeMap<(String, &'static str), u64>,
    prompt_tokens: BTreeMap<String, u64>,
    completion_tokens: BTreeMap<String, u64>,
    ttft: BTreeMap<String, Histogram>,
    itl: BTreeMap<String, Histogram>,
    /// (model, step kind) -> step durations, and rows fed.
    steps: BTreeMap<(String, StepKind), Histogram>,
    step_rows: BTreeMap<(String, StepKind), u64>,
}

/// A gauge family: name, help, and how to read it from a model's [`ModelGauges`].
type Gauge = (&'static str, &'static str, fn(&ModelGauges) -> String);

/// A model's gauges at scrape time.
pub struct ModelGauges {
    pub name: String,
    pub queued: usize,
    pub running: usize,
    pub max_batch: usize,
    /// Bytes of weights the model holds on its device.
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub workspace_bytes: u64,
    pub device: String,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// The Prometheus name of a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("metrics lock"))
    }

    /// A Generate request ended with `code` (OK: the stream completed).
    pub fn request_done(&self, model: &str, code: tonic::Code) {
        self.with(|m| {
            *m.requests
                .entry((model.to_string(), code_name(code)))
                .or_default() += 1
        });
    }

    pub fn tokens(&self, model: &str, prompt: u64, completion: u64) {
        self.with(|m| {
            *m.prompt_tokens.entry(model.to_string()).or_default() += prompt;
            *m.completion_tokens.entry(model.to_string()).or_default() += completion;
        });
    }

    pub fn ttft(&self, model: &str, d: Duration) {
        self.with(|m| {
            m.ttft
                .entry(model.to_string())
                .or_insert_with(|| Histogram::new(TTFT_BUCKETS))
                .observe(d.as_secs_f64())
        });
    }

    pub fn inter_token(&self, model: &str, d: Duration) {
        self.with(|m| {
            m.itl
                .entry(model.to_string())
                .or_insert_with(|| Histogram::new(ITL_BUCKETS))
                .observe(d.as_secs_f64())
        });
    }

    /// One scheduler step: what it fed (`rows` token rows in all) and how long the model's
    /// step took (forward, sampling, the host wait for the tokens).
    pub fn step(&self, model: &str, kind: StepKind, rows: usize, d: Duration) {
        self.with(|m| {
            let key = (model.to_string(), kind);
            *m.step_rows.entry(key.clone()).or_default() += rows as u64;
            m.steps
                .entry(key)
                .or_insert_with(|| Histogram::new(STEP_BUCKETS))
                .observe(d.as_secs_f64())
        });
    }

    /// The exposition text (format 0.0.4).
    pub fn render(&self, models: &[ModelGauges]) -> String {
        let mut out = String::new();
        let m = self.inner.lock().expect("metrics lock");
        header(
            &mut out,
            "llm_requests_total",
            "counter",
            "Generate requests finished, by model and gRPC status code.",
        );
        for ((model, code), v) in &m.requests {
            let _ = writeln!(
                out,
                "llm_requests_total{{model=\"{model}\",code=\"{code}\"}} {v}"
            );
        }
        for (name, help, per_model) in [
            (
                "llm_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                &m.prompt_tokens,
            ),
            (
                "llm_completion_tokens_total",
                "Tokens generated, streamed to clients.",
                &m.completion_tokens,
            ),
        ] {
            header(&mut out, name, "counter", help);
            for (model, v) in per_model {
                let _ = writeln!(out, "{name}{{model=\"{model}\"}} {v}");
            }
        }
        for (name, help, per_model) in [
            (
                "llm_time_to_first_token_seconds",
                "From request received to first token sent.",
                &m.ttft,
            ),
            (
                "llm_inter_token_latency_seconds",
                "Time between consecutive tokens of a stream.",
                &m.itl,
            ),
        ] {
            header(&mut out, name, "histogram", help);
            for (model, h) in per_model {
                h.render(&mut out, name, &format!("model=\"{model}\""));
            }
        }
        let name = "llm_step_duration_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "Model steps of the scheduler (all running sequences), by kind: decode, prefill, mixed.",
        );
        for ((model, kind), h) in &m.steps {
            let labels = format!("model=\"{model}\",kind=\"{}\"", kind.name());
            h.render(&mut out, name, &labels);
        }
        let name = "llm_step_rows_total";
        header(
            &mut out,
            name,
            "counter",
            "Token rows fed to the model, by step kind.",
        );
        for ((model, kind), v) in &m.step_rows {
            let _ = writeln!(
                out,
                "{name}{{model=\"{model}\",kind=\"{}\"}} {v}",
                kind.name()
            );
        }
        drop(m);
        let gauges: [Gauge; 6] = [
            (
                "llm_queue_depth",
                "Requests waiting for a slot in the running batch.",
                |g| g.queued.to_string(),
            ),
            (
                "llm_running_batch_size",
                "Sequences in the running batch.",
                |g| g.running.to_string(),
            ),
            (
                "llm_max_batch_size",
                "Configured running batch limit.",
                |g| g.max_batch.to_string(),
            ),
            (
                "llm_model_weight_bytes",
                "Bytes of weights the model holds on its device.",
                |g| g.weight_bytes.to_string(),
            ),
            (
                "llm_model_kv_cache_bytes",
                "Bytes the KV cache of the model's running sequences holds.",
                |g| g.kv_cache_bytes.to_string(),
            ),
            (
                "llm_model_workspace_bytes",
                "Device memory the model's pool holds beyond weights and KV cache (0 on the CPU).",
                |g| g.workspace_bytes.to_string(),
            ),
        ];
        for (name, help, value) in gauges {
            header(&mut out, name, "gauge", help);
            for g in models {
                let _ = writeln!(
                    out,
                    "{name}{{model=\"{}\",device=\"{}\"}} {}",
                    g.name,
                    g.device,
                    value(g)
                );
            }
        }
        out
    }
}

/// The `# HELP` / `# TYPE` lines of a metric family.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Serve GET /metrics on `listener` (HTTP/1.1, one response per connection).
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
) {
    let render = std::sync::Arc::new(render);
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            // Read the request head (scrapers send no body).
            while len < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[len..])).await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => len += n,
                }
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if head.starts_with("GET ")
                && (path == "/metrics" || path.starts_with("/metrics?"))
            {
                ("200 OK", render())
            } else {
                ("404 Not Found", "GET /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.ttft("a", Duration::from_millis(7));
        m.ttft("a", Duration::from_millis(70));
        let text = m.render(&[]);
        assert!(text.contains("llm_time_to_first_token_seconds_bucket{model=\"a\",le=\"0.005\"} 0"));
        assert!(text.contains("llm_time_to_first_token_seconds_bucket{model=\"a\",le=\"0.01\"} 1"));
        assert!(text.contains("llm_time_to_first_token_seconds_bucket{model=\"a\",le=\"0.1\"} 2"));
        assert!(text.contains("llm_time_to_first_token_seconds_bucket{model=\"a\",le=\"+Inf\"} 2"));
        assert!(text.contains("llm_time_to_first_token_seconds_count{model=\"a\"} 2"));
    }

    #[test]
    fn steps_are_split_by_kind() {
        let m = Metrics::default();
        m.step("a", StepKind::Decode, 16, Duration::from_millis(12));
        m.step("a", StepKind::Decode, 15, Duration::from_millis(13));
        m.step("a", StepKind::Mixed, 47, Duration::from_millis(40));
        let text = m.render(&[]);
        let series = "llm_step_duration_seconds_bucket{model=\"a\",kind=";
        assert!(text.contains(&format!("{series}\"decode\",le=\"0.01\"}} 0")));
        assert!(text.contains(&format!("{series}\"decode\",le=\"0.015\"}} 2")));
        assert!(text.contains(&format!("{series}\"mixed\",le=\"0.03\"}} 0")));
        assert!(text.contains(&format!("{series}\"mixed\",le=\"0.05\"}} 1")));
        assert!(!text.contains("kind=\"prefill\""));
        assert!(text.contains("llm_step_rows_total{model=\"a\",kind=\"decode\"} 31"));
        assert!(text.contains("llm_step_rows_total{model=\"a\",kind=\"mixed\"} 47"));
    }

    #[test]
    fn requests_are_counted_by_code() {
        let m = Metrics::default();
        m.request_done("a", tonic::Code::Ok);
        m.request_done("a", tonic::Code::Ok);
        m.request_done("a", tonic::Code::ResourceExhausted);
        let text = m.render(&[ModelGauges {
            name: "a".into(),
            queued: 3,
            running: 2,
            max_batch: 8,
            weight_bytes: 10,
            kv_cache_bytes: 20,
            workspace_bytes: 0,
            device: "cpu".into(),
        }]);
        assert!(text.contains("llm_requests_total{model=\"a\",code=\"OK\"} 2"));
        assert!(text.contains("llm_requests_total{model=\"a\",code=\"RESOURCE_EXHAUSTED\"} 1"));
        assert!(text.contains("llm_queue_depth{model=\"a\",device=\"cpu\"} 3"));
        assert!(text.contains("llm_running_batch_size{model=\"a\",device=\"cpu\"} 2"));
        assert!(text.contains("llm_model_kv_cache_bytes{model=\"a\",device=\"cpu\"} 20"));
    }
}
