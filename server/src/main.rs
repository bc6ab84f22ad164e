//! `llm-server`: serves chat/text generation over gRPC from architecture plugins.

mod cuda;
mod detok;
mod error;
mod hub;
mod metrics;
mod plugin;
mod registry;
mod request;
mod scheduler;
mod service;
mod template;
mod tokenizer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use llm_proto::v1::llm_service_server::LlmServiceServer;

use crate::metrics::Metrics;
use crate::plugin::Plugins;
use crate::registry::{LoadSpec, Registry};
use crate::request::Limits;
use crate::scheduler::SchedulerConfig;
use crate::service::Service;

#[derive(Debug, Parser)]
#[command(
    name = "llm-server",
    version,
    about = "Serve open-weight chat models over gRPC"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Load a model at startup: NAME=SOURCE, SOURCE a local HF directory, a .gguf file or a hub
    /// id (org/name[@revision], through the HF cache).
    /// Repeatable.
    #[arg(long = "load", value_name = "NAME=SOURCE")]
    load: Vec<String>,
    /// How linear weights are held for models loaded at startup (and LoadModel's default):
    /// auto = NF4 for float checkpoints (the bitsandbytes recipe), as stored for quantized ones
    /// (bnb NF4 stays NF4, GGUF is dequantized); nf4 = always NF4; none = float.
    #[arg(long, default_value = "auto", value_parser = ["auto", "nf4", "none"])]
    quantization: String,
    /// Device for models loaded at startup (and LoadModel's default): cpu, cuda or cuda:N.
    /// A CUDA device is set up at start (its driver context held until exit), so a missing
    /// driver or device fails here rather than at the first load.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: String,
    /// Directory holding the architecture plugins (lib<arch>_backend.so). Default: the
    /// directory of this executable.
    #[arg(long)]
    plugin_dir: Option<PathBuf>,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    max_new_tokens_limit: u32,
    /// Cap on positions per sequence (prompt + generated); 0 = each model's own context length.
    #[arg(long, default_value_t = 0)]
    max_context: u32,
    /// Sequences a model decodes together at most (the running batch).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Requests per model that may wait for a slot in the running batch; more get
    /// RESOURCE_EXHAUSTED at once.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Prompt tokens a sequence feeds per step: longer prompts are prefilled in chunks, so a
    /// newcomer never stalls the running streams for more than one chunk.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Token rows one model step feeds at most, decode rows and prompt chunks together (vLLM's
    /// max-num-batched-tokens): a wave of newcomers' prompts is spread over steps, so running
    /// streams never wait for one huge step. Default: the prefill chunk rounded up to a power of
    /// two, and more than --max-batch (on CUDA the load warms prompt shapes up to 512 rows;
    /// a larger budget compiles and tunes its new shapes on first use).
    #[arg(long)]
    max_step_tokens: Option<usize>,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9090.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Require `authorization: Bearer TOKEN` on LoadModel and UnloadModel.
    #[arg(long, env = "LLM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// LoadModel may only read sources under these directories (repeatable). Without any, any
    /// path the server can read is allowed.
    #[arg(long = "model-root", value_name = "DIR")]
    model_roots: Vec<PathBuf>,
    /// On SIGTERM/Ctrl-C: stop accepting, let running streams finish for this many seconds,
    /// then end the rest with UNAVAILABLE.
    #[arg(long, default_value_t = 10.0)]
    shutdown_grace: f64,
    /// Where GPU plugins keep compiled kernels and autotune results across runs: a model's
    /// first load on a machine compiles and tunes (minutes on CUDA), later loads in any process
    /// reuse them. Default: $XDG_CACHE_HOME/llm-serve/kernels, else
    /// ~/.cache/llm-serve/kernels. `none`: compile and tune in every process.
    #[arg(long, value_name = "DIR")]
    kernel_cache: Option<String>,
}

/// `--kernel-cache`: the directory, the default one, or none.
fn kernel_cache_dir(arg: Option<&str>) -> Option<PathBuf> {
    match arg {
        Some("none") => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("llm-serve").join("kernels")),
    }
}

/// `--max-step-tokens`, or its default: the prefill chunk rounded up to a power of two (the row
/// counts a GPU backend's matmuls are tuned by) and past `--max-batch`. Refused when it leaves
/// no row for a prompt next to a full batch of decodes.
fn step_tokens(
    arg: Option<usize>,
    prefill_chunk: usize,
    max_batch: usize,
) -> Result<usize, String> {
    let max_batch = max_batch.max(1);
    match arg {
        Some(n) if n <= max_batch => Err(format!(
            "--max-step-tokens {n}: must exceed --max-batch ({max_batch}), or prompts could wait \
             behind a full batch of decodes forever"
        )),
        Some(n) => Ok(n),
        None => Ok(prefill_chunk
            .max(max_batch + 1)
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX)),
    }
}

fn parse_load(s: &str) -> Result<(String, PathBuf), String> {
    let (name, source) = s
        .split_once('=')
        .ok_or_else(|| format!("--load {s:?}: expected NAME=SOURCE"))?;
    Ok((name.to_string(), PathBuf::from(source)))
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("llm-server: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let loads = args
        .load
        .iter()
        .map(|s| parse_load(s))
        .collect::<Result<Vec<_>, _>>()?;
    let plugin_dir = match args.plugin_dir {
        Some(d) => d,
        None => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()))
            .ok_or("cannot locate the executable's directory; pass --plugin-dir")?,
    };
    let plugins = Plugins::discover(&plugin_dir).map_err(|e| e.to_string())?;
    if plugins.model_types().is_empty() {
        tracing::warn!(dir = %plugin_dir.display(), "no plugins found");
    }
    // Held to the end of `run`, past the last unload (dropped after the registry).
    let _cuda_context = match cuda::ordinal(&args.device) {
        Some(ordinal) => {
            let (context, info) = cuda::PrimaryContext::retain(&args.device, ordinal)?;
            tracing::info!(
                device = %args.device,
                name = %info.name,
                free_mib = info.free_bytes >> 20,
                total_mib = info.total_bytes >> 20,
                "CUDA context up"
            );
            Some(context)
        }
        None => None,
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let sched = SchedulerConfig {
        max_batch: args.max_batch.max(1),
        max_context: 0,
        max_queue: args.max_queue,
        prefill_chunk: args.prefill_chunk.max(1),
        max_step_tokens: step_tokens(args.max_step_tokens, args.prefill_chunk, args.max_batch)?,
    };
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(Registry::new(
        plugins,
        health_reporter,
        sched,
        metrics.clone(),
        &args.model_roots,
        kernel_cache_dir(args.kernel_cache.as_deref()),
    )?);
    registry.init_health().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llm_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| e.to_string())?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llm_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| e.to_string())?;

    let service = Service {
        registry: registry.clone(),
        limits: Limits {
            max_new_tokens: args.max_new_tokens_limit,
        },
        default_device: args.device.clone(),
        default_quantization: args.quantization.clone(),
        default_max_context: args.max_context,
        admin_token: args.admin_token.clone().filter(|t| !t.is_empty()),
    };
    if let Some(addr) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} for metrics: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        println!("llm-server metrics on http://{local}/metrics");
        let (m, r) = (metrics.clone(), registry.clone());
        tokio::spawn(metrics::serve(listener, move || m.render(&r.gauges())));
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(addr = %local, "listening");
    // One machine-readable line on stdout, so a supervisor (or a test) using `--listen HOST:0`
    // learns the port.
    println!("llm-server listening on {local}");

    // Startup loads run while the server already answers (health says NOT_SERVING until a model
    // is ready); a failed startup load is fatal, as the user asked for that model.
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for (name, source) in loads {
        let registry = registry.clone();
        let spec = LoadSpec {
            name: name.clone(),
            source,
            device: args.device.clone(),
            quantization: args.quantization.clone(),
            max_context: args.max_context,
        };
        let fail_tx = fail_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = registry.load(spec).await {
                let _ = fail_tx.send(format!("loading `{name}`: {e}"));
            }
        });
    }
    drop(fail_tx);

    // Graceful shutdown: on the signal, health turns NOT_SERVING and the server stops
    // accepting; running streams get `--shutdown-grace` seconds, then the models are unloaded,
    // which ends what still runs with UNAVAILABLE.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    {
        let registry = registry.clone();
        let grace = std::time::Duration::from_secs_f64(args.shutdown_grace.max(0.0));
        tokio::spawn(async move {
            shutdown_signal().await;
            registry.set_not_serving().await;
            let _ = stop_tx.send(true);
            tokio::time::sleep(grace).await;
            tracing::info!("grace period over; ending the remaining streams");
            registry.unload_all().await;
        });
    }
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(LlmServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming(listener), async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        });
    let r = tokio::select! {
        r = server => r.map_err(|e| e.to_string()),
        Some(msg) = fail_rx.recv() => Err(msg),
    };
    registry.unload_all().await;
    r
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// The gRPC connections `listener` accepts, each with `TCP_NODELAY` set.
///
/// Why: a streamed token is a small HTTP/2 DATA frame written right after the response
/// headers or the previous token. With Nagle's algorithm on, the kernel holds it until the
/// client ACKs the frame before, and the client delays that ACK (40 ms on Linux): `llm bench`
/// measured a 41-44 ms time to first token where the server's own figure was 9-11 ms, and
/// tokens arriving in bursts. tonic sets the option only on sockets it binds itself
/// (`Server::tcp_nodelay` with `serve`), not on an incoming stream it is handed.
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// `cpu`, `cuda` or `cuda:N`. Whether the plugin was built with CUDA and the device exists is
/// the plugin's to say at load.
fn parse_device(s: &str) -> Result<String, String> {
    if s == "cpu" || cuda::ordinal(s).is_some() {
        Ok(s.to_string())
    } else {
        Err(format!("expected cpu, cuda or cuda:N, got {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::{incoming, step_tokens};

    #[tokio::test]
    async fn accepted_connections_send_small_frames_at_once() {
        use tokio_stream::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let conn = accepted.next().await.unwrap().unwrap();
        assert!(
            conn.nodelay().unwrap(),
            "TCP_NODELAY off: tokens wait for ACKs"
        );
    }

    #[test]
    fn step_budget_defaults_to_a_power_of_two_past_the_batch() {
        assert_eq!(step_tokens(None, 512, 16), Ok(512));
        assert_eq!(step_tokens(None, 300, 8), Ok(512));
        assert_eq!(step_tokens(None, 64, 256), Ok(512));
        assert_eq!(step_tokens(Some(100), 512, 16), Ok(100));
        let err = step_tokens(Some(16), 512, 16).unwrap_err();
        assert!(err.contains("--max-step-tokens 16") && err.contains("--max-batch"));
    }
}
