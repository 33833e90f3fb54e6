//! DeepSeek V4 Flash model: shape, weights bound to the file, the `Backend` trait, the
//! forward pass written once over it, KV state and sessions.

pub mod backend;
pub mod config;
pub mod forward;
pub mod kv;
pub mod layout;
pub mod numerics;
pub mod sampler;
pub mod shape;
pub mod synthetic;
pub mod weights;

pub use backend::{Backend, CompKind, CompUpdate, KvStore, QueryHeads, RopeKind, RowRounding};
pub use forward::{Buffers, ForwardOptions, LogitRows, Model, Session};
pub use kv::HostKv;
pub use shape::{LayerKind, ModelShape};
pub use weights::{ModelWeights, TensorSource, TensorView};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("weights: {0}")]
    Weights(String),
    #[error("config: {0}")]
    Config(String),
    #[error("token id {token} out of range (vocab {vocab})")]
    Token { token: u32, vocab: usize },
    #[error("context full ({ctx} tokens)")]
    ContextFull { ctx: usize },
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("backend: {0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, Error>;
