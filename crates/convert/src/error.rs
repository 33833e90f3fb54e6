//! Errors of the converter. Every message names the file, key or tensor at fault.

use std::path::PathBuf;

/// Everything that can go wrong while converting a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{dir}: no *.safetensors files found")]
    NoWeights { dir: PathBuf },
    #[error("config.json: missing key `{0}`")]
    MissingKey(String),
    #[error("config.json: key `{key}` {problem}")]
    BadKey { key: String, problem: String },
    #[error("tokenizer.json: {0}")]
    Tokenizer(String),
    #[error("missing tensor `{name}` (looked for: {candidates})")]
    MissingTensor { name: String, candidates: String },
    #[error("tensor `{name}`: shape {got:?}, expected {expected:?}")]
    BadShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor `{name}`: unsupported source dtype {dtype}")]
    BadDtype { name: String, dtype: String },
    #[error("tensor `{name}`: {problem}")]
    BadValue { name: String, problem: String },
    #[error("tensor `{name}`: cannot store as {ty}: {problem}")]
    Unsupported {
        name: String,
        ty: &'static str,
        problem: String,
    },
    #[error("quantizing `{name}`: {source}")]
    Quant {
        name: String,
        #[source]
        source: ds4_quant::Error,
    },
    #[error("writing GGUF: {0}")]
    Gguf(#[from] ds4_gguf::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_key(key: &str, problem: impl Into<String>) -> Self {
        Error::BadKey {
            key: key.to_string(),
            problem: problem.into(),
        }
    }
}
