//! Every way reading or writing a GGUF file can fail, each with a one-line message.

use std::path::PathBuf;

/// Errors of the GGUF reader, writer and typed getters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "truncated file: {what}{context} needs {need} bytes at offset {offset}, file has {len}"
    )]
    Truncated {
        what: &'static str,
        /// Where in the structure (" of key \"x\"", " of tensor 3"), filled in by the caller.
        context: String,
        offset: u64,
        need: u64,
        len: u64,
    },
    #[error("bad magic {found:#010x} at offset 0 (expected 0x46554747, \"GGUF\")")]
    BadMagic { found: u32 },
    #[error("unsupported GGUF version {0} (only version 3 is supported)")]
    Version(u32),
    #[error(
        "{what} count {count} cannot fit in the {remaining} bytes left after offset {offset} (truncated or corrupt file)"
    )]
    AbsurdCount {
        what: &'static str,
        count: u64,
        offset: u64,
        remaining: u64,
    },
    #[error(
        "{what}{context}: string length {len} at offset {offset} exceeds the {remaining} bytes left (truncated or corrupt file)"
    )]
    AbsurdString {
        what: &'static str,
        context: String,
        offset: u64,
        len: u64,
        remaining: u64,
    },
    #[error("{what}{context}: string at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        what: &'static str,
        context: String,
        offset: u64,
    },
    #[error("key \"{key}\": arrays nested deeper than {max} levels")]
    NestingTooDeep { key: String, max: usize },
    #[error("key \"{key}\": unknown value type id {type_id} at offset {offset}")]
    UnknownValueType {
        key: String,
        type_id: u32,
        offset: u64,
    },
    #[error("key \"{key}\": bool byte {byte} at offset {offset} is neither 0 nor 1")]
    InvalidBool { key: String, byte: u8, offset: u64 },
    #[error("duplicate metadata key \"{0}\"")]
    DuplicateKey(String),
    #[error("general.alignment must be a non-zero u32, found {0}")]
    BadAlignment(String),
    #[error("tensor \"{name}\": n_dims {n_dims} out of range 1..=8")]
    BadDimCount { name: String, n_dims: u32 },
    #[error("tensor \"{name}\": dims {dims:?} overflow the element or byte count")]
    DimsOverflow { name: String, dims: Vec<u64> },
    #[error("tensor \"{name}\": unknown ggml type id {type_id}")]
    UnknownTensorType { name: String, type_id: u32 },
    #[error(
        "tensor \"{name}\": row of {ne0} elements is not a whole number of {ty} blocks ({block} elements)"
    )]
    NotBlockMultiple {
        name: String,
        ne0: u64,
        ty: crate::GgmlType,
        block: u64,
    },
    #[error("duplicate tensor name \"{0}\"")]
    DuplicateTensor(String),
    #[error(
        "tensor \"{name}\": relative offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        name: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor \"{name}\": data [{start}, {end}) lies past the end of the file ({len} bytes)")]
    TensorPastEof {
        name: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error(
        "tensors \"{first}\" and \"{second}\" overlap (offset {second_offset} < end {first_end})"
    )]
    OverlappingTensors {
        first: String,
        second: String,
        first_end: u64,
        second_offset: u64,
    },
    #[error("missing metadata key \"{0}\"")]
    MissingKey(String),
    #[error("key \"{key}\": expected {expected}, found {found}")]
    KeyType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("key \"{key}\": item {index} is {value}, expected a non-negative value")]
    NegativeItem {
        key: String,
        index: usize,
        value: i64,
    },
    #[error("tensor \"{name}\": {got} bytes given, {ty} {dims:?} needs {want}")]
    TensorSize {
        name: String,
        dims: Vec<u64>,
        ty: crate::GgmlType,
        got: u64,
        want: u64,
    },
    #[error("key \"{key}\": array item {index} is {found}, the array declares {declared}")]
    ArrayItemMismatch {
        key: String,
        index: usize,
        found: &'static str,
        declared: &'static str,
    },
}

impl Error {
    /// Adds where in the file structure a low-level read failed, if not said yet.
    pub(crate) fn in_context(mut self, ctx: impl FnOnce() -> String) -> Self {
        match &mut self {
            Error::Truncated { context, .. }
            | Error::AbsurdString { context, .. }
            | Error::InvalidUtf8 { context, .. }
                if context.is_empty() =>
            {
                *context = ctx();
            }
            _ => {}
        }
        self
    }
}

pub type Result<T> = std::result::Result<T, Error>;
