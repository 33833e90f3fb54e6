//! GGUF v3 container: reading (mmap, hostile-input safe) and writing.

mod types;

pub use types::GgmlType;
