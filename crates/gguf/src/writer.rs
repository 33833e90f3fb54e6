//! GGUF v3 writer: metadata in insertion order, tensors with computed aligned offsets.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::reader::{align_up, tensor_extent};
use crate::value::Value;
use crate::{
    DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GgmlType, KEY_ALIGNMENT, MAX_DIMS, MAX_NESTING,
};

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF file in memory and writes it out in one go.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata record; a key added twice keeps its first position and the last
    /// value. Values are validated (array item types, nesting) when written.
    /// `general.alignment` (u32) sets the data alignment (default 32).
    pub fn add_kv(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, slot)) => *slot = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// Adds a tensor; `data` must hold exactly the bytes `ty` needs for `dims`
    /// (ggml order, ne0 first).
    pub fn add_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<()> {
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(Error::BadDimCount {
                name: name.to_string(),
                n_dims: u32::try_from(dims.len()).unwrap_or(u32::MAX),
            });
        }
        let (_, want) = tensor_extent(name, dims, ty)?;
        let got = data.len() as u64;
        if got != want {
            return Err(Error::TensorSize {
                name: name.to_string(),
                dims: dims.to_vec(),
                ty,
                got,
                want,
            });
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::DuplicateTensor(name.to_string()));
        }
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ggml_type: ty,
            data,
        });
        Ok(())
    }

    fn alignment(&self) -> Result<u64> {
        match self.metadata.iter().find(|(k, _)| k == KEY_ALIGNMENT) {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, Value::U32(a))) if *a != 0 => Ok(u64::from(*a)),
            Some((_, v)) => Err(Error::BadAlignment(format!("{} {v}", v.type_description()))),
        }
    }

    /// Writes the complete file to `out`.
    pub fn write_to(&self, mut out: impl Write) -> Result<()> {
        let alignment = self.alignment()?;
        for (key, value) in &self.metadata {
            check_value(key, value, 0)?;
        }
        let mut head = Vec::new();
        head.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
        head.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut head, key);
            head.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut head, value);
        }
        let mut rel = 0u64;
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            head.extend_from_slice(&rel.to_le_bytes());
            rel = padded(rel, t.data.len() as u64, alignment)?;
        }
        let data_start = align_up(head.len() as u64, alignment).ok_or_else(too_big)?;
        head.resize(usize::try_from(data_start).map_err(|_| too_big())?, 0);
        out.write_all(&head)?;
        let zeros = vec![0u8; usize::try_from(alignment).map_err(|_| too_big())?];
        for t in &self.tensors {
            out.write_all(&t.data)?;
            let len = t.data.len() as u64;
            let pad = padded(0, len, alignment)? - len;
            out.write_all(zeros.get(..pad as usize).unwrap_or(&[]))?;
        }
        out.flush()?;
        Ok(())
    }

    /// Writes to `path` through a temporary file in the same directory, renamed into place
    /// only once complete, so a failed write never leaves a half-written `path`.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let file_err = |p: &Path| {
            let p = p.to_path_buf();
            move |source| Error::File { path: p, source }
        };
        let result = (|| {
            let file = std::fs::File::create(&tmp).map_err(file_err(&tmp))?;
            let mut buf = std::io::BufWriter::with_capacity(1 << 20, file);
            self.write_to(&mut buf)?;
            let file = buf.into_inner().map_err(|e| Error::File {
                path: tmp.clone(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(file_err(&tmp))?;
            std::fs::rename(&tmp, path).map_err(file_err(path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn too_big() -> Error {
    Error::Io(std::io::Error::other("GGUF file size overflows"))
}

/// `start + len` rounded up to the alignment.
fn padded(start: u64, len: u64, alignment: u64) -> Result<u64> {
    start
        .checked_add(len)
        .and_then(|end| align_up(end, alignment))
        .ok_or_else(too_big)
}

fn check_value(key: &str, value: &Value, depth: usize) -> Result<()> {
    if let Value::Array { item_type, items } = value {
        if depth >= MAX_NESTING {
            return Err(Error::NestingTooDeep {
                key: key.to_string(),
                max: MAX_NESTING,
            });
        }
        for (index, item) in items.iter().enumerate() {
            if item.value_type() != *item_type {
                return Err(Error::ArrayItemMismatch {
                    key: key.to_string(),
                    index,
                    found: item.value_type().name(),
                    declared: item_type.name(),
                });
            }
            check_value(key, item, depth + 1)?;
        }
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_str(out, s),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Array { item_type, items } => {
            out.extend_from_slice(&item_type.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}
