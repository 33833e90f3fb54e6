//! GGUF v3 container: reading (mmap, hostile-input safe) and writing.
//!
//! Layout per model.md §4.1: header (magic, version 3, tensor count, metadata count),
//! metadata records, tensor infos, then the data section aligned to `general.alignment`
//! (default 32). The reader validates every tensor extent at open, so
//! [`GgufFile::tensor_data`] is a plain zero-copy slice.

mod error;
mod reader;
mod types;
mod value;
mod writer;

pub use error::{Error, Result};
pub use reader::{GgufFile, TensorInfo};
pub use types::GgmlType;
pub use value::{Value, ValueType};
pub use writer::GgufWriter;

/// "GGUF" read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// The only container version accepted.
pub const GGUF_VERSION: u32 = 3;
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata key that overrides the alignment.
pub const KEY_ALIGNMENT: &str = "general.alignment";
/// Deepest array nesting accepted.
pub const MAX_NESTING: usize = 8;
/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 8;
