//! One error type for everything a plugin does; it crosses the ABI as an [`ErrorCode`] + message.

use llm_abi::ErrorCode;
use llm_formats::FormatError;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CoreError {
    pub code: ErrorCode,
    pub message: String,
}

impl CoreError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        CoreError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unimplemented, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ResourceExhausted, message)
    }
}

impl From<FormatError> for CoreError {
    fn from(e: FormatError) -> Self {
        let code = match &e {
            FormatError::NotFound(_) => ErrorCode::NotFound,
            FormatError::Corrupt(_) => ErrorCode::DataLoss,
            FormatError::Invalid(_) => ErrorCode::InvalidArgument,
            FormatError::Unsupported(_) => ErrorCode::Unimplemented,
        };
        CoreError::new(code, e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, CoreError>;
