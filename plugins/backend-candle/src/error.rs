//! The backend's error type. Every variant renders as one sentence a user can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot read model `{path}`: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("model `{path}` is not a usable checkpoint: {cause} (is the file complete? `harness fetch` downloads the default model again)")]
    Corrupt { path: PathBuf, cause: String },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("the input is {tokens} tokens long, more than the model's limit of {limit}")]
    TooLong { tokens: usize, limit: usize },
    /// A wrong option; the message names it (the SDK or the host prefixes the plugin's name).
    #[error("{0}")]
    Options(String),
    #[error("internal error in the candle backend: {0}")]
    Internal(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, BackendError>;
