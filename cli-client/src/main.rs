//! `llm`: the command-line client. Streams generations to the terminal, manages models and
//! generates load (`llm bench`).

mod bench;

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use llm_proto::v1::llm_service_client::LlmServiceClient;
use llm_proto::v1::{
    generate_request, Chat, ChatMessage, DescribeModelRequest, FinishReason, GenerateRequest,
    GenerationParams, ListModelsRequest, LoadModelRequest, TokenIds, UnloadModelRequest,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "llm", version, about = "Client for llm-server")]
struct Cli {
    /// Server URL.
    #[arg(
        long,
        global = true,
        env = "LLM_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// Bearer token for LoadModel/UnloadModel, when the server requires one.
    #[arg(long, global = true, env = "LLM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text and stream it to stdout as it arrives.
    Generate(GenerateArgs),
    /// List the models: ready, loading (download progress) and unloading, with device and memory.
    Models,
    /// Look inside a model: the module tree as PyTorch prints it, parameters, the memory
    /// footprint, and device memory. `llm describe NAME` for a loaded model; `llm describe
    /// --source PATH_OR_HUB_ID` for one not loaded (config.json only), with whether it fits.
    Describe(DescribeArgs),
    /// Load a model: `llm load NAME SOURCE` (SOURCE: an HF directory or a .gguf file on the
    /// server's machine, or a hub id `org/name[@revision]`). Loading a served name from another
    /// source swaps it without dropping requests.
    Load {
        name: String,
        source: String,
        #[arg(long, default_value = "")]
        device: String,
        #[arg(long, default_value = "")]
        quantization: String,
        /// Cap on positions per sequence (0 = the model's own).
        #[arg(long, default_value_t = 0)]
        max_context: u32,
    },
    /// Unload a model and free its memory.
    Unload { name: String },
    /// Load test: concurrent Generate streams; reports latency, status codes, TTFT,
    /// inter-token latency and tokens/s. Exits non-zero when a request ends with an
    /// unexpected status.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Args)]
struct DescribeArgs {
    /// A loaded model's name.
    #[arg(required_unless_present = "source", conflicts_with = "source")]
    name: Option<String>,
    /// A model not loaded: a directory with config.json, a .gguf file or a hub id.
    #[arg(long)]
    source: Option<String>,
    /// auto, nf4 or none (with --source; default the server's).
    #[arg(long, default_value = "", requires = "source")]
    quantization: String,
    /// cpu, cuda or cuda:N to plan for (with --source; default the server's).
    #[arg(long, default_value = "", requires = "source")]
    device: String,
    /// KV cache positions per sequence to plan for (0: the server's --max-context, else the
    /// model's own).
    #[arg(long, default_value_t = 0, requires = "source")]
    max_context: u32,
    /// Sequences to plan KV cache for (0: the server's --max-batch).
    #[arg(long, default_value_t = 0, requires = "source")]
    max_batch: u32,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
struct GenerateArgs {
    /// Model name (see `llm models`).
    #[arg(long)]
    model: String,
    /// System message (with --user).
    #[arg(long, requires = "user")]
    system: Option<String>,
    /// User message: the conversation is rendered with the model's chat template.
    #[arg(long, conflicts_with_all = ["prompt", "prompt_ids"])]
    user: Option<String>,
    /// Merge --system into the user message (for templates without a system role: Gemma-2,
    /// Mixtral).
    #[arg(long, requires = "system")]
    fold_system_prompt: bool,
    /// Raw prompt text (no chat template).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long)]
    max_new_tokens: Option<u32>,
    /// 0 = greedy (the default).
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print the generated token ids, space-separated, instead of text.
    #[arg(long)]
    ids: bool,
    /// Print timing and token counts to stderr at the end.
    #[arg(long)]
    stats: bool,
    /// Deadline in seconds (sent as grpc-timeout); the server ends the stream with
    /// DEADLINE_EXCEEDED when it passes.
    #[arg(long)]
    timeout: Option<f64>,
}

async fn connect(url: &str) -> Result<LlmServiceClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad server URL {url:?}"))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    Ok(LlmServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// The server's status as the user should read it.
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn generate(url: &str, a: GenerateArgs) -> Result<()> {
    let input = if let Some(user) = a.user {
        let mut messages = Vec::new();
        if let Some(system) = a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system,
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: user,
        });
        generate_request::Input::Chat(Chat {
            messages,
            fold_system_prompt: a.fold_system_prompt,
        })
    } else if let Some(prompt) = a.prompt {
        generate_request::Input::Prompt(prompt)
    } else if let Some(ids) = a.prompt_ids {
        generate_request::Input::PromptIds(TokenIds { ids })
    } else {
        bail!("give one of --user, --prompt or --prompt-ids");
    };
    let req = GenerateRequest {
        model: a.model,
        input: Some(input),
        params: Some(GenerationParams {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            stop: a.stop,
            repetition_penalty: a.repetition_penalty,
            min_p: a.min_p,
            ignore_eos: a.ignore_eos,
            ..Default::default()
        }),
    };
    let mut client = connect(url).await?;
    let mut request = tonic::Request::new(req);
    if let Some(t) = a.timeout {
        request.set_timeout(Duration::from_secs_f64(t));
    }
    let mut stream = client
        .generate(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    let mut first_id = true;
    let mut ended_with_newline = true;
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(status_error)?;
        if a.ids {
            if let Some(id) = msg.token_id {
                write!(out, "{}{id}", if first_id { "" } else { " " })?;
                first_id = false;
            }
        } else if !msg.text.is_empty() {
            out.write_all(msg.text.as_bytes())?;
            ended_with_newline = msg.text.ends_with('\n');
        }
        out.flush()?;
        if let Some(done) = msg.done {
            if a.ids || !ended_with_newline {
                writeln!(out)?;
            }
            if a.stats {
                let reason = FinishReason::try_from(done.finish_reason)
                    .map(|r| {
                        r.as_str_name()
                            .trim_start_matches("FINISH_REASON_")
                            .to_lowercase()
                    })
                    .unwrap_or_default();
                eprintln!(
                    "[{reason}] prompt {} tokens, generated {} tokens, TTFT {:.1} ms, {:.1} tok/s, seed {}",
                    done.prompt_tokens,
                    done.completion_tokens,
                    done.time_to_first_token_ms,
                    done.decode_tokens_per_second,
                    done.seed
                );
            }
            return Ok(());
        }
    }
    bail!("the stream ended without a final message")
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let token = cli.admin_token.as_deref();
    let result = match cli.command {
        Command::Generate(a) => generate(&cli.server, a).await,
        Command::Models => models(&cli.server).await,
        Command::Describe(a) => describe(&cli.server, a).await,
        Command::Load {
            name,
            source,
            device,
            quantization,
            max_context,
        } => {
            let req = LoadModelRequest {
                name,
                source,
                device,
                quantization,
                max_context,
            };
            match admin(req, token) {
                Ok(req) => load(&cli.server, req).await,
                Err(e) => Err(e),
            }
        }
        Command::Unload { name } => match admin(name, token) {
            Ok(req) => unload(&cli.server, req).await,
            Err(e) => Err(e),
        },
        Command::Bench(a) => match bench::run(&cli.server, a).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                eprintln!("error: some requests ended with an unexpected status");
                std::process::exit(2);
            }
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn models(url: &str) -> Result<()> {
    let mut client = connect(url).await?;
    let list = client
        .list_models(ListModelsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "{:<24} {:<8} {:<10} {:<7} {:<5} {:>8} {:>14} {:>11}  SOURCE",
        "NAME", "ARCH", "STATE", "DEVICE", "QUANT", "CONTEXT", "PARAMETERS", "MEMORY"
    );
    for m in list.models {
        let state = if m.state == "loading" && m.download_total_bytes > 0 {
            format!(
                "loading {:.0}%",
                100.0 * m.download_done_bytes as f64 / m.download_total_bytes as f64
            )
        } else {
            m.state.clone()
        };
        println!(
            "{:<24} {:<8} {:<10} {:<7} {:<5} {:>8} {:>14} {:>11}  {}",
            m.name,
            m.architecture,
            state,
            m.device,
            m.quantization,
            m.max_context,
            m.num_parameters,
            mb(m.weight_bytes + m.kv_cache_bytes + m.workspace_bytes),
            m.source
        );
    }
    Ok(())
}

/// Bytes as the seed prints them: decimal megabytes, thousands grouped, one decimal.
fn mb(bytes: u64) -> String {
    let tenths = ((bytes as f64) / 1e5).round() as u64;
    format!("{}.{} MB", group(tenths / 10), tenths % 10)
}

async fn describe(url: &str, a: DescribeArgs) -> Result<()> {
    use llm_proto::v1::describe_model_request::Target;
    let mut client = connect(url).await?;
    let from_source = a.source.is_some();
    let target = match (a.name, a.source) {
        (_, Some(s)) => Target::Source(s),
        (Some(n), None) => Target::Name(n),
        (None, None) => bail!("give a model name or --source"),
    };
    let d = client
        .describe_model(DescribeModelRequest {
            target: Some(target),
            quantization: a.quantization,
            device: a.device,
            max_context: a.max_context,
            max_batch: a.max_batch,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    // The tree and the footprint line exactly as the seed's `print(model)` and
    // `print(f"Memory footprint: ...")` show them.
    println!("{}", d.module_tree);
    println!("{}", d.footprint_text);
    println!("Parameters: {}", group(d.num_parameters));
    println!("Quantization: {}   Device: {}", d.quantization, d.device);
    let m = d.memory.unwrap_or_default();
    if from_source {
        println!(
            "Planned device memory: {} = weights {} + KV cache {} ({} sequences x {} positions)",
            mb(m.total),
            mb(m.weights),
            mb(m.kv_cache),
            d.max_batch,
            d.max_context
        );
        println!(
            "Fits {}: {} ({} free of {})",
            d.device,
            if d.fits { "yes" } else { "no" },
            mb(d.device_free_bytes),
            mb(d.device_total_bytes)
        );
    } else {
        println!(
            "Device memory held: {} = weights {} + KV cache {} + workspace {}",
            mb(m.total),
            mb(m.weights),
            mb(m.kv_cache),
            mb(m.workspace)
        );
    }
    Ok(())
}

fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// An admin request, with the bearer token when one is given.
fn admin<T>(msg: T, token: Option<&str>) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        let v = format!("Bearer {t}")
            .parse()
            .context("--admin-token: not a valid header value")?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

async fn load(url: &str, req: tonic::Request<LoadModelRequest>) -> Result<()> {
    let mut client = connect(url).await?;
    let name = req.get_ref().name.clone();
    let mut watcher = client.clone();
    let call = tokio::spawn(async move { client.load_model(req).await });
    // While the server loads (and downloads a hub model), show its progress from ListModels.
    let bar = indicatif::ProgressBar::hidden();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid template"),
    );
    bar.set_message(format!("downloading {name}"));
    while !call.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(list) = watcher.list_models(ListModelsRequest {}).await else {
            continue;
        };
        if let Some(m) = list
            .into_inner()
            .models
            .into_iter()
            .find(|m| m.name == name && m.state == "loading" && m.download_total_bytes > 0)
        {
            if bar.is_hidden() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
            bar.set_length(m.download_total_bytes);
            bar.set_position(m.download_done_bytes);
        }
    }
    bar.finish_and_clear();
    let r = call
        .await
        .context("load task")?
        .map_err(status_error)?
        .into_inner();
    let m = r.model.unwrap_or_default();
    println!(
        "loaded {} ({}, {} parameters, context {}) on {} in {:.0} ms",
        m.name, m.architecture, m.num_parameters, m.max_context, m.device, r.load_ms
    );
    Ok(())
}

async fn unload(url: &str, req: tonic::Request<String>) -> Result<()> {
    let mut client = connect(url).await?;
    let (meta, ext, name) = req.into_parts();
    client
        .unload_model(tonic::Request::from_parts(
            meta,
            ext,
            UnloadModelRequest { name: name.clone() },
        ))
        .await
        .map_err(status_error)?;
    println!("unloaded {name}");
    Ok(())
}
