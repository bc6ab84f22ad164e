//! The gRPC edge: thin handlers (proto in, call, proto out). All validation lives in
//! `request.rs`, all errors map to Status in `error.rs`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use llm_proto::v1::llm_service_server::LlmService;
use llm_proto::v1::{
    GenerateRequest, GenerateResponse, ListModelsRequest, ListModelsResponse, LoadModelRequest,
    LoadModelResponse, UnloadModelRequest, UnloadModelResponse,
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::{Result, ServerError};
use crate::registry::{LoadSpec, LoadedModel, Registry};
use crate::request::{self, Input, Limits, ValidRequest};
use crate::scheduler::Job;

pub struct Service {
    pub registry: Arc<Registry>,
    pub limits: Limits,
    /// Defaults for LoadModel fields left empty.
    pub default_device: String,
    pub default_quantization: String,
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
    async fn generate_inner(&self, req: GenerateRequest) -> Result<GenerateStream> {
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
        })?;
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
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
        Ok(Response::new(self.generate_inner(req.into_inner()).await?))
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
        let r = req.into_inner();
        if r.source.is_empty() {
            return Err(ServerError::invalid("source", "is required").into());
        }
        let or = |v: String, d: &str| if v.is_empty() { d.to_string() } else { v };
        let spec = LoadSpec {
            name: r.name,
            source: r.source.into(),
            device: or(r.device, &self.default_device),
            quantization: or(r.quantization, &self.default_quantization),
            max_context: r.max_context,
        };
        let (info, load_ms) = self.registry.load(spec).await?;
        Ok(Response::new(LoadModelResponse {
            model: Some(info),
            load_ms,
        }))
    }

    async fn unload_model(
        &self,
        req: Request<UnloadModelRequest>,
    ) -> std::result::Result<Response<UnloadModelResponse>, Status> {
        self.registry.unload(&req.into_inner().name).await?;
        Ok(Response::new(UnloadModelResponse {}))
    }
}
