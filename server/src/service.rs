//! The gRPC edge: thin handlers (proto in, call, proto out). All validation lives in
//! `request.rs`, all errors map to Status in `error.rs`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_proto::v1::describe_model_request::Target;
use llm_proto::v1::llm_service_server::LlmService;
use llm_proto::v1::{
    DescribeModelRequest, DescribeModelResponse, GenerateRequest, GenerateResponse,
    ListModelsRequest, ListModelsResponse, LoadModelRequest, LoadModelResponse, UnloadModelRequest,
    UnloadModelResponse,
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::{Result, ServerError};
use crate::registry::{DescribeSpec, LoadSpec, LoadedModel, Registry};
use crate::request::{self, Input, Limits, ValidRequest};
use crate::scheduler::Job;

pub struct Service {
    pub registry: Arc<Registry>,
    pub limits: Limits,
    /// Defaults for LoadModel fields left empty.
    pub default_device: String,
    pub default_quantization: String,
    /// The server's --max-context (0 = each model's own), for DescribeModel plans.
    pub default_max_context: u32,
    /// LoadModel and UnloadModel require `authorization: Bearer <token>` when set.
    pub admin_token: Option<String>,
}

/// The `grpc-timeout` header: an integer of at most 8 digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Admin RPCs: the bearer token must match (compared in constant time).
fn check_admin(token: &Option<String>, meta: &tonic::metadata::MetadataMap) -> Result<()> {
    let Some(want) = token else {
        return Ok(());
    };
    let got = meta
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same = got.len() == want.len()
        && got
            .bytes()
            .zip(want.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ServerError::Unauthenticated(
            "this server requires an admin token for LoadModel/UnloadModel: send metadata `authorization: Bearer <token>` (llm --admin-token or LLM_ADMIN_TOKEN)".into(),
        ))
    }
}

/// Turn the request's input into prompt token ids (template + tokenizer), on a blocking thread.
fn tokenize(model: &LoadedModel, input: &Input) -> Result<Vec<u32>> {
    let text = &model.text;
    let ids = match input {
        Input::Chat(messages) => {
            let template = text.chat_template.as_ref().ok_or_else(|| {
                ServerError::invalid(
                    "chat",
                    format!(
                        "model `{}` has no chat template; send `prompt` or `prompt_ids`",
                        model.info.name
                    ),
                )
            })?;
            let rendered = template.render(messages, true)?;
            // The template already holds the special tokens (HF apply_chat_template tokenizes
            // with add_special_tokens=False).
            text.encode(&rendered, false)?
        }
        Input::Prompt(p) => text.encode(p, true)?,
        Input::Ids(ids) => {
            let vocab = model.info.vocab_size;
            if let Some(i) = ids.iter().position(|&t| t >= vocab) {
                return Err(ServerError::invalid(
                    format!("prompt_ids.ids[{i}]"),
                    format!(
                        "token id {} is not below the vocabulary size {vocab}",
                        ids[i]
                    ),
                ));
            }
            ids.clone()
        }
    };
    if ids.is_empty() {
        return Err(ServerError::invalid(
            input.field(),
            "tokenizes to no tokens",
        ));
    }
    let vocab = model.info.vocab_size;
    if let Some(&bad) = ids.iter().find(|&&t| t >= vocab) {
        return Err(ServerError::invalid(
            input.field(),
            format!(
                "the tokenizer produced token id {bad}, outside model `{}`'s vocabulary of {vocab}: its tokenizer does not match its weights",
                model.info.name
            ),
        ));
    }
    let ctx = model.info.max_context as usize;
    if ids.len() >= ctx {
        return Err(ServerError::invalid(
            input.field(),
            format!(
                "the prompt is {} tokens; model `{}` has a context of {ctx}, which must leave room for at least one new token",
                ids.len(),
                model.info.name
            ),
        ));
    }
    Ok(ids)
}

type GenerateStream =
    Pin<Box<dyn Stream<Item = std::result::Result<GenerateResponse, Status>> + Send>>;

impl Service {
    async fn generate_inner(
        &self,
        req: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<GenerateStream> {
        let received = Instant::now();
        let valid: ValidRequest = request::parse(req, self.limits, rand_seed)?;
        let model = self.registry.get(&valid.model)?;
        let m = model.clone();
        let input = valid.input;
        let prompt = tokio::task::spawn_blocking(move || tokenize(&m, &input))
            .await
            .map_err(|e| ServerError::Internal(format!("tokenizer task: {e}")))??;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        model.scheduler().submit(Job {
            prompt,
            params: valid.params,
            tx,
            received,
            deadline,
        })?;
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }
}

/// An empty request field falls back to the server's default.
fn or(v: String, default: &str) -> String {
    if v.is_empty() {
        default.to_string()
    } else {
        v
    }
}

/// A seed for requests that do not give one.
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[tonic::async_trait]
impl LlmService for Service {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> std::result::Result<Response<Self::GenerateStream>, Status> {
        let deadline = grpc_timeout(req.metadata()).map(|d| Instant::now() + d);
        let req = req.into_inner();
        let model = req.model.clone();
        match self.generate_inner(req, deadline).await {
            Ok(stream) => Ok(Response::new(stream)),
            Err(e) => {
                let status: Status = e.into();
                // Label by model only for loaded ones: clients choose the names.
                let label = if self.registry.get(&model).is_ok() {
                    model.as_str()
                } else {
                    "-"
                };
                self.registry.metrics.request_done(label, status.code());
                Err(status)
            }
        }
    }

    async fn list_models(
        &self,
        _req: Request<ListModelsRequest>,
    ) -> std::result::Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(ListModelsResponse {
            models: self.registry.list(),
        }))
    }

    async fn load_model(
        &self,
        req: Request<LoadModelRequest>,
    ) -> std::result::Result<Response<LoadModelResponse>, Status> {
        check_admin(&self.admin_token, req.metadata())?;
        let r = req.into_inner();
        if r.source.is_empty() {
            return Err(ServerError::invalid("source", "is required").into());
        }
        self.registry
            .check_source(std::path::Path::new(&r.source))?;
        let spec = LoadSpec {
            name: r.name,
            source: r.source.into(),
            device: or(r.device, &self.default_device),
            quantization: or(r.quantization, &self.default_quantization),
            // The server's --max-context caps LoadModel too unless the request sets its own.
            max_context: if r.max_context == 0 {
                self.default_max_context
            } else {
                r.max_context
            },
        };
        let (info, load_ms) = self.registry.load(spec).await?;
        Ok(Response::new(LoadModelResponse {
            model: Some(info),
            load_ms,
        }))
    }

    async fn describe_model(
        &self,
        req: Request<DescribeModelRequest>,
    ) -> std::result::Result<Response<DescribeModelResponse>, Status> {
        let r = req.into_inner();
        let out = match r.target {
            Some(Target::Name(name)) => self.registry.describe_loaded(&name)?,
            Some(Target::Source(source)) if !source.is_empty() => {
                let spec = DescribeSpec {
                    source,
                    device: or(r.device, &self.default_device),
                    quantization: or(r.quantization, &self.default_quantization),
                    max_context: if r.max_context == 0 {
                        self.default_max_context
                    } else {
                        r.max_context
                    },
                    max_batch: r.max_batch,
                };
                let registry = self.registry.clone();
                // Reads config files (or fetches one from the hub): off the async threads.
                tokio::task::spawn_blocking(move || registry.describe_source(spec))
                    .await
                    .map_err(|e| ServerError::Internal(format!("describe task: {e}")))??
            }
            _ => {
                return Err(ServerError::invalid(
                    "target",
                    "give `name` (a loaded model) or `source`",
                )
                .into())
            }
        };
        Ok(Response::new(out))
    }

    async fn unload_model(
        &self,
        req: Request<UnloadModelRequest>,
    ) -> std::result::Result<Response<UnloadModelResponse>, Status> {
        check_admin(&self.admin_token, req.metadata())?;
        self.registry.unload(&req.into_inner().name).await?;
        Ok(Response::new(UnloadModelResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;

    #[test]
    fn grpc_timeout_units() {
        let mut m = MetadataMap::new();
        for (v, d) in [
            ("200m", Duration::from_millis(200)),
            ("3S", Duration::from_secs(3)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("500u", Duration::from_micros(500)),
            ("7n", Duration::from_nanos(7)),
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), Some(d), "{v}");
        }
        m.insert("grpc-timeout", "12x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }

    #[test]
    fn admin_token_is_checked() {
        let token = Some("s3cret".to_string());
        let mut m = MetadataMap::new();
        assert!(check_admin(&token, &m).is_err());
        m.insert("authorization", "Bearer wrong!".parse().unwrap());
        assert!(check_admin(&token, &m).is_err());
        m.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(check_admin(&token, &m).is_ok());
        assert!(check_admin(&None, &MetadataMap::new()).is_ok());
    }
}
