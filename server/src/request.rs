//! Parse, don't validate: a proto `GenerateRequest` becomes a typed [`ValidRequest`] or an
//! INVALID_ARGUMENT naming the field at fault.

use llm_abi::{SamplingParams, MAX_TOP_LOGPROBS};
use llm_proto::v1::{generate_request, GenerateRequest};

use crate::error::{Result, ServerError};
use crate::template::Message;

/// Default `max_new_tokens` when the request leaves it unset.
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 256;
pub const MAX_STOP_STRINGS: usize = 16;

/// Roles a chat message may have.
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Chat(Vec<Message>),
    Prompt(String),
    Ids(Vec<u32>),
}

impl Input {
    /// The request field this input came from (for messages about it).
    pub fn field(&self) -> &'static str {
        match self {
            Input::Chat(_) => "chat",
            Input::Prompt(_) => "prompt",
            Input::Ids(_) => "prompt_ids",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidParams {
    pub max_new_tokens: u32,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub model: String,
    pub input: Input,
    pub params: ValidParams,
}

/// Server-wide limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_new_tokens: u32,
}

fn finite(field: &str, v: f32) -> Result<f32> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(ServerError::invalid(
            field,
            format!("must be a finite number (got {v})"),
        ))
    }
}

/// Merge a leading system message into the first user message, for templates without a system
/// role: `"{system}\n\n{user}"`.
pub fn fold_system_prompt(msgs: &mut Vec<Message>) {
    if msgs.len() >= 2 && msgs[0].role == "system" && msgs[1].role == "user" {
        let system = msgs.remove(0);
        msgs[0].content = format!("{}\n\n{}", system.content, msgs[0].content);
    }
}

pub fn parse(
    req: GenerateRequest,
    limits: Limits,
    random_seed: impl FnOnce() -> u64,
) -> Result<ValidRequest> {
    if req.model.is_empty() {
        return Err(ServerError::invalid("model", "is required"));
    }
    let input = match req.input {
        None => {
            return Err(ServerError::invalid(
                "input",
                "is required: set one of chat, prompt or prompt_ids",
            ))
        }
        Some(generate_request::Input::Chat(chat)) => {
            if chat.messages.is_empty() {
                return Err(ServerError::invalid(
                    "chat.messages",
                    "must hold at least one message",
                ));
            }
            let fold = chat.fold_system_prompt;
            let mut msgs = Vec::with_capacity(chat.messages.len());
            for (i, m) in chat.messages.into_iter().enumerate() {
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(ServerError::invalid(
                        format!("chat.messages[{i}].role"),
                        format!(
                            "unknown role {:?} (expected one of {})",
                            m.role,
                            ROLES.join(", ")
                        ),
                    ));
                }
                msgs.push(Message {
                    role: m.role,
                    content: m.content,
                });
            }
            if fold {
                fold_system_prompt(&mut msgs);
            }
            Input::Chat(msgs)
        }
        Some(generate_request::Input::Prompt(p)) => {
            if p.is_empty() {
                return Err(ServerError::invalid("prompt", "must not be empty"));
            }
            Input::Prompt(p)
        }
        Some(generate_request::Input::PromptIds(ids)) => {
            if ids.ids.is_empty() {
                return Err(ServerError::invalid(
                    "prompt_ids.ids",
                    "must hold at least one token id",
                ));
            }
            Input::Ids(ids.ids)
        }
    };
    let p = req.params.unwrap_or_default();
    let max_new_tokens = p
        .max_new_tokens
        .unwrap_or(DEFAULT_MAX_NEW_TOKENS.min(limits.max_new_tokens));
    if max_new_tokens == 0 {
        return Err(ServerError::invalid(
            "params.max_new_tokens",
            "must be at least 1",
        ));
    }
    if max_new_tokens > limits.max_new_tokens {
        return Err(ServerError::invalid(
            "params.max_new_tokens",
            format!(
                "{max_new_tokens} is over this server's limit of {} (--max-new-tokens-limit)",
                limits.max_new_tokens
            ),
        ));
    }
    let temperature = finite("params.temperature", p.temperature.unwrap_or(0.0))?;
    if temperature < 0.0 {
        return Err(ServerError::invalid(
            "params.temperature",
            format!("must be >= 0 (got {temperature}); 0 means greedy"),
        ));
    }
    let top_p = finite("params.top_p", p.top_p.unwrap_or(1.0))?;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ServerError::invalid(
            "params.top_p",
            format!("must be in (0, 1] (got {top_p})"),
        ));
    }
    let min_p = finite("params.min_p", p.min_p.unwrap_or(0.0))?;
    if !(0.0..1.0).contains(&min_p) {
        return Err(ServerError::invalid(
            "params.min_p",
            format!("must be in [0, 1) (got {min_p})"),
        ));
    }
    let repetition_penalty = finite(
        "params.repetition_penalty",
        p.repetition_penalty.unwrap_or(1.0),
    )?;
    if repetition_penalty <= 0.0 {
        return Err(ServerError::invalid(
            "params.repetition_penalty",
            format!("must be > 0 (got {repetition_penalty}); 1 means off"),
        ));
    }
    if p.top_logprobs as usize > MAX_TOP_LOGPROBS {
        return Err(ServerError::invalid(
            "params.top_logprobs",
            format!("at most {MAX_TOP_LOGPROBS} (got {})", p.top_logprobs),
        ));
    }
    if p.stop.len() > MAX_STOP_STRINGS {
        return Err(ServerError::invalid(
            "params.stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings (got {})",
                p.stop.len()
            ),
        ));
    }
    if let Some(i) = p.stop.iter().position(String::is_empty) {
        return Err(ServerError::invalid(
            format!("params.stop[{i}]"),
            "must not be empty",
        ));
    }
    let seed = p.seed.unwrap_or_else(random_seed);
    Ok(ValidRequest {
        model: req.model,
        input,
        params: ValidParams {
            max_new_tokens,
            sampling: SamplingParams {
                temperature,
                top_k: p.top_k.unwrap_or(0),
                top_p,
                min_p,
                repetition_penalty,
                seed,
                top_logprobs: p.top_logprobs,
                logprobs: u8::from(p.top_logprobs > 0),
            },
            stop: p.stop,
            ignore_eos: p.ignore_eos,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_proto::v1::{Chat, ChatMessage, GenerationParams};

    const LIMITS: Limits = Limits {
        max_new_tokens: 100,
    };

    fn chat(role: &str) -> GenerateRequest {
        GenerateRequest {
            model: "m".into(),
            input: Some(generate_request::Input::Chat(Chat {
                messages: vec![ChatMessage {
                    role: role.into(),
                    content: "hi".into(),
                }],
                fold_system_prompt: false,
            })),
            params: None,
        }
    }

    fn with(params: GenerationParams) -> GenerateRequest {
        GenerateRequest {
            params: Some(params),
            ..chat("user")
        }
    }

    fn field_of(r: Result<ValidRequest>) -> String {
        match r.unwrap_err() {
            ServerError::InvalidArgument { field, .. } => field,
            other => panic!("not an invalid argument: {other}"),
        }
    }

    #[test]
    fn defaults_are_greedy_and_seeded() {
        let v = parse(chat("user"), LIMITS, || 42).unwrap();
        assert_eq!(v.params.max_new_tokens, 100.min(DEFAULT_MAX_NEW_TOKENS));
        assert_eq!(v.params.sampling.temperature, 0.0);
        assert_eq!(v.params.sampling.seed, 42);
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(
            field_of(parse(chat("robot"), LIMITS, || 0)),
            "chat.messages[0].role"
        );
        let p = |f: fn(&mut GenerationParams)| {
            let mut g = GenerationParams::default();
            f(&mut g);
            field_of(parse(with(g), LIMITS, || 0))
        };
        assert_eq!(p(|g| g.temperature = Some(-0.5)), "params.temperature");
        assert_eq!(p(|g| g.temperature = Some(f32::NAN)), "params.temperature");
        assert_eq!(p(|g| g.top_p = Some(0.0)), "params.top_p");
        assert_eq!(p(|g| g.top_p = Some(1.5)), "params.top_p");
        assert_eq!(p(|g| g.max_new_tokens = Some(0)), "params.max_new_tokens");
        assert_eq!(p(|g| g.max_new_tokens = Some(101)), "params.max_new_tokens");
        assert_eq!(
            p(|g| g.repetition_penalty = Some(0.0)),
            "params.repetition_penalty"
        );
        assert_eq!(p(|g| g.min_p = Some(1.0)), "params.min_p");
        assert_eq!(p(|g| g.top_logprobs = 21), "params.top_logprobs");
        assert_eq!(
            p(|g| g.stop = vec!["a".into(), "".into()]),
            "params.stop[1]"
        );
        let empty = GenerateRequest {
            input: Some(generate_request::Input::Chat(Chat {
                messages: vec![],
                fold_system_prompt: false,
            })),
            ..chat("user")
        };
        assert_eq!(field_of(parse(empty, LIMITS, || 0)), "chat.messages");
        let none = GenerateRequest {
            input: None,
            ..chat("user")
        };
        assert_eq!(field_of(parse(none, LIMITS, || 0)), "input");
        let nomodel = GenerateRequest {
            model: String::new(),
            ..chat("user")
        };
        assert_eq!(field_of(parse(nomodel, LIMITS, || 0)), "model");
    }
}
