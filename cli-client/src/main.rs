//! `llm`: the command-line client. Streams generations to the terminal and manages models.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use llm_proto::v1::llm_service_client::LlmServiceClient;
use llm_proto::v1::{
    generate_request, Chat, ChatMessage, FinishReason, GenerateRequest, GenerationParams,
    ListModelsRequest, LoadModelRequest, TokenIds, UnloadModelRequest,
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text and stream it to stdout as it arrives.
    Generate(GenerateArgs),
    /// List the loaded models.
    Models,
    /// Load a model: `llm load NAME SOURCE` (SOURCE: an HF directory or a .gguf file, on the
    /// server's machine).
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
    let mut stream = client
        .generate(req)
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
    let result = match cli.command {
        Command::Generate(a) => generate(&cli.server, a).await,
        Command::Models => models(&cli.server).await,
        Command::Load {
            name,
            source,
            device,
            quantization,
            max_context,
        } => load(&cli.server, name, source, device, quantization, max_context).await,
        Command::Unload { name } => unload(&cli.server, name).await,
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
        "{:<24} {:<10} {:<7} {:<6} {:<5} {:>8} {:>14}  SOURCE",
        "NAME", "ARCH", "STATE", "DEVICE", "QUANT", "CONTEXT", "PARAMETERS"
    );
    for m in list.models {
        println!(
            "{:<24} {:<10} {:<7} {:<6} {:<5} {:>8} {:>14}  {}",
            m.name,
            m.architecture,
            m.state,
            m.device,
            m.quantization,
            m.max_context,
            m.num_parameters,
            m.source
        );
    }
    Ok(())
}

async fn load(
    url: &str,
    name: String,
    source: String,
    device: String,
    quantization: String,
    max_context: u32,
) -> Result<()> {
    let mut client = connect(url).await?;
    let r = client
        .load_model(LoadModelRequest {
            name,
            source,
            device,
            quantization,
            max_context,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let m = r.model.unwrap_or_default();
    println!(
        "loaded {} ({}, {} parameters, context {}) on {} in {:.0} ms",
        m.name, m.architecture, m.num_parameters, m.max_context, m.device, r.load_ms
    );
    Ok(())
}

async fn unload(url: &str, name: String) -> Result<()> {
    let mut client = connect(url).await?;
    client
        .unload_model(UnloadModelRequest { name: name.clone() })
        .await
        .map_err(status_error)?;
    println!("unloaded {name}");
    Ok(())
}
