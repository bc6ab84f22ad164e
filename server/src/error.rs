//! The server's one error type and its one mapping to gRPC status, at the edge.

use llm_abi::ErrorCode;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A request field is malformed or out of range. `field` is its path, e.g. `params.top_p`.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The chat template raised (`raise_exception`) or failed to render.
    #[error("chat template: {0}")]
    Template(String),
    #[error("model `{0}` is not loaded (see ListModels)")]
    ModelNotFound(String),
    #[error("model `{0}` is already loaded (unload it first)")]
    ModelExists(String),
    /// A LoadModel of a name while another load of that name is still running.
    #[error("model `{0}` is being loaded by another LoadModel; retry when it is done")]
    LoadInProgress(String),
    /// A model's files: missing, corrupt, or not acceptable.
    #[error("{message}")]
    ModelFiles { code: ErrorCode, message: String },
    /// An error a plugin returned.
    #[error("{message}")]
    Plugin { code: ErrorCode, message: String },
    #[error("{0}")]
    ResourceExhausted(String),
    /// An admin RPC without the right bearer token.
    #[error("{0}")]
    Unauthenticated(String),
    /// A LoadModel source outside the model roots.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ServerError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ServerError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<llm_formats::FormatError> for ServerError {
    fn from(e: llm_formats::FormatError) -> Self {
        use llm_formats::FormatError as F;
        let code = match &e {
            F::NotFound(_) => ErrorCode::NotFound,
            F::Corrupt(_) => ErrorCode::DataLoss,
            F::Invalid(_) => ErrorCode::InvalidArgument,
            F::Unsupported(_) => ErrorCode::Unimplemented,
        };
        ServerError::ModelFiles {
            code,
            message: e.to_string(),
        }
    }
}

fn abi_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::Ok | ErrorCode::Internal => Code::Internal,
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::DataLoss => Code::DataLoss,
        ErrorCode::ResourceExhausted => Code::ResourceExhausted,
        ErrorCode::Unimplemented => Code::Unimplemented,
    }
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Status {
        let code = match &e {
            ServerError::InvalidArgument { .. } | ServerError::Template(_) => Code::InvalidArgument,
            ServerError::ModelNotFound(_) => Code::NotFound,
            ServerError::ModelExists(_) => Code::AlreadyExists,
            ServerError::LoadInProgress(_) => Code::Aborted,
            ServerError::ModelFiles { code, .. } | ServerError::Plugin { code, .. } => {
                abi_code(*code)
            }
            ServerError::ResourceExhausted(_) => Code::ResourceExhausted,
            ServerError::Unauthenticated(_) => Code::Unauthenticated,
            ServerError::PermissionDenied(_) => Code::PermissionDenied,
            ServerError::Unavailable(_) => Code::Unavailable,
            ServerError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, ServerError>;
