//! GGUF v3 reader. Every length, count and offset read from the file is checked
//! against the bytes actually present before it is used, with checked arithmetic, so a
//! hostile file yields an [`Error`] and never a panic or an out-of-bounds read.
//!
//! Unknown tensor type ids are an error here (ds4 only warns): without a known block size
//! the tensor's extent cannot be bounds- or overlap-checked, and no backend could use it.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::value::{Value, ValueType};
use crate::{DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GgmlType, MAX_DIMS, MAX_NESTING};

/// One entry of the tensor table, with its extent already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: ne0 (contiguous) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute file offset of the first byte.
    pub offset: u64,
    pub n_bytes: u64,
    pub n_elements: u64,
}

impl TensorInfo {
    /// Offset relative to the start of the data section, as stored in the file.
    pub fn relative_offset(&self, data_offset: u64) -> u64 {
        self.offset.saturating_sub(data_offset)
    }
}

enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file whose tensor data stays in place (mapped or owned).
pub struct GgufFile {
    backing: Backing,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("len", &self.backing.bytes().len())
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file_err = |source| Error::File {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(file_err)?;
        let len = file.metadata().map_err(file_err)?.len();
        if len == 0 {
            // mmap of an empty file fails on some platforms; parse it as bytes instead.
            return Self::from_bytes(Vec::new());
        }
        // SAFETY: the map is read-only and private to this process. Like every mmap-based
        // loader we rely on the file not being truncated by another process while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(file_err)?;
        Self::parse(Backing::Mmap(map))
    }

    /// Parses a file held in memory (tests, fuzzing, small files).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        Self::parse(Backing::Owned(bytes))
    }

    fn parse(backing: Backing) -> Result<GgufFile> {
        let parsed = parse_layout(backing.bytes())?;
        Ok(GgufFile {
            backing,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            key_index: parsed.key_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Absolute offset of the (aligned) data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
    /// Size of the whole file in bytes.
    pub fn file_len(&self) -> u64 {
        self.backing.bytes().len() as u64
    }
    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }
    /// All metadata records in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        let i = *self.key_index.get(key)?;
        self.metadata.get(i).map(|(_, v)| v)
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        let i = *self.tensor_index.get(name)?;
        self.tensors.get(i)
    }
    /// The bytes of a tensor of this file (zero-copy; extents were checked at open).
    /// A `TensorInfo` from another file that does not fit gives an empty slice.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let bytes = self.backing.bytes();
        let range = usize::try_from(info.offset).ok().and_then(|start| {
            let len = usize::try_from(info.n_bytes).ok()?;
            Some(start..start.checked_add(len)?)
        });
        range.and_then(|r| bytes.get(r)).unwrap_or(&[])
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| Error::MissingKey(key.to_string()))
    }

    fn type_error(key: &str, expected: &'static str, found: &Value) -> Error {
        Error::KeyType {
            key: key.to_string(),
            expected,
            found: found.type_description(),
        }
    }

    /// Exactly a u32 value.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.required(key)?;
        v.as_u32().ok_or_else(|| Self::type_error(key, "u32", v))
    }
    /// A u64 or u32 value.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.required(key)?;
        v.as_u64()
            .ok_or_else(|| Self::type_error(key, "u64 or u32", v))
    }
    /// An f32, f64, u32 or i32 value, as f32.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.required(key)?;
        v.as_f32()
            .ok_or_else(|| Self::type_error(key, "f32, f64, u32 or i32", v))
    }
    /// Exactly a bool value.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.required(key)?;
        v.as_bool().ok_or_else(|| Self::type_error(key, "bool", v))
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.required(key)?;
        v.as_str().ok_or_else(|| Self::type_error(key, "string", v))
    }
    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.required(key)?;
        match v.as_array() {
            Some((ValueType::String, items)) => {
                Ok(items.iter().filter_map(Value::as_str).collect())
            }
            _ => Err(Self::type_error(key, "array[string]", v)),
        }
    }
    /// An array of u32 or i32 (negative items rejected), as u32.
    pub fn get_u32_array(&self, key: &str) -> Result<Vec<u32>> {
        let v = self.required(key)?;
        let items = match v.as_array() {
            Some((ValueType::U32 | ValueType::I32, items)) => items,
            _ => return Err(Self::type_error(key, "array[u32] or array[i32]", v)),
        };
        items
            .iter()
            .enumerate()
            .map(|(index, item)| match *item {
                Value::U32(x) => Ok(x),
                Value::I32(x) => u32::try_from(x).map_err(|_| Error::NegativeItem {
                    key: key.to_string(),
                    index,
                    value: i64::from(x),
                }),
                _ => Err(Self::type_error(key, "array[u32] or array[i32]", v)),
            })
            .collect()
    }
    /// An array of f32 or f64, as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let v = self.required(key)?;
        match v.as_array() {
            Some((ValueType::F32 | ValueType::F64, items)) => {
                Ok(items.iter().filter_map(Value::as_f32).collect())
            }
            _ => Err(Self::type_error(key, "array[f32] or array[f64]", v)),
        }
    }
}

struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8]> {
        let truncated = || Error::Truncated {
            what,
            context: String::new(),
            offset: self.pos as u64,
            need: n,
            len: self.buf.len() as u64,
        };
        let n_usize = usize::try_from(n).map_err(|_| truncated())?;
        let end = self.pos.checked_add(n_usize).ok_or_else(truncated)?;
        let slice = self.buf.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &'static str) -> Result<String> {
        let len_offset = self.offset();
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(Error::AbsurdString {
                what,
                context: String::new(),
                offset: len_offset,
                len,
                remaining: self.remaining(),
            });
        }
        let start = self.offset();
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::InvalidUtf8 {
            what,
            context: String::new(),
            offset: start,
        })
    }

    /// Fails unless `count` items of at least `min_size` bytes each can still fit.
    fn check_count(&self, what: &'static str, count: u64, min_size: u64) -> Result<()> {
        let fits = count
            .checked_mul(min_size)
            .is_some_and(|need| need <= self.remaining());
        if fits {
            Ok(())
        } else {
            Err(Error::AbsurdCount {
                what,
                count,
                offset: self.offset(),
                remaining: self.remaining(),
            })
        }
    }
}

fn read_value(cur: &mut Cursor<'_>, ty: ValueType, key: &str, depth: usize) -> Result<Value> {
    Ok(match ty {
        ValueType::U8 => Value::U8(cur.u8("u8 value")?),
        ValueType::I8 => Value::I8(cur.u8("i8 value")? as i8),
        ValueType::U16 => Value::U16(cur.u16("u16 value")?),
        ValueType::I16 => Value::I16(cur.u16("i16 value")? as i16),
        ValueType::U32 => Value::U32(cur.u32("u32 value")?),
        ValueType::I32 => Value::I32(cur.u32("i32 value")? as i32),
        ValueType::F32 => Value::F32(f32::from_bits(cur.u32("f32 value")?)),
        ValueType::U64 => Value::U64(cur.u64("u64 value")?),
        ValueType::I64 => Value::I64(cur.u64("i64 value")? as i64),
        ValueType::F64 => Value::F64(f64::from_bits(cur.u64("f64 value")?)),
        ValueType::Bool => {
            let offset = cur.offset();
            match cur.u8("bool value")? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                byte => {
                    return Err(Error::InvalidBool {
                        key: key.to_string(),
                        byte,
                        offset,
                    });
                }
            }
        }
        ValueType::String => Value::String(cur.string("string value")?),
        ValueType::Array => {
            if depth >= MAX_NESTING {
                return Err(Error::NestingTooDeep {
                    key: key.to_string(),
                    max: MAX_NESTING,
                });
            }
            let item_type = read_value_type(cur, key, "array item type")?;
            let len = cur.u64("array length")?;
            cur.check_count("array item", len, item_type.min_encoded_size())?;
            let mut items = Vec::with_capacity(preallocation(len));
            for _ in 0..len {
                items.push(read_value(cur, item_type, key, depth + 1)?);
            }
            Value::Array { item_type, items }
        }
    })
}

fn read_value_type(cur: &mut Cursor<'_>, key: &str, what: &'static str) -> Result<ValueType> {
    let offset = cur.offset();
    let type_id = cur.u32(what)?;
    ValueType::from_id(type_id).ok_or_else(|| Error::UnknownValueType {
        key: key.to_string(),
        type_id,
        offset,
    })
}

/// Capacity to reserve for `count` items read from the file. Counts are checked against
/// the bytes left, but one byte of a large mapped file can become a 32-byte `Value`, so
/// only a bounded amount is reserved up front; honest large tables grow as they parse.
fn preallocation(count: u64) -> usize {
    usize::try_from(count.min(1 << 16)).unwrap_or(0)
}

/// Smallest tensor info entry: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO: u64 = 8 + 4 + 8 + 4 + 8;
/// Smallest metadata record: key length, type, a one-byte value.
const MIN_KV: u64 = 8 + 4 + 1;

fn parse_layout(buf: &[u8]) -> Result<Parsed> {
    let mut cur = Cursor { buf, pos: 0 };
    let magic = cur.u32("magic")?;
    if magic != GGUF_MAGIC {
        return Err(Error::BadMagic { found: magic });
    }
    let version = cur.u32("version")?;
    if version != GGUF_VERSION {
        return Err(Error::Version(version));
    }
    let n_tensors = cur.u64("tensor count")?;
    let n_kv = cur.u64("metadata count")?;
    cur.check_count("metadata", n_kv, MIN_KV)?;

    let mut metadata = Vec::with_capacity(preallocation(n_kv));
    let mut key_index = HashMap::with_capacity(metadata.capacity());
    for i in 0..n_kv {
        let key = cur
            .string("metadata key")
            .map_err(|e| e.in_context(|| format!(" of metadata record {i}")))?;
        let ty = read_value_type(&mut cur, &key, "value type")
            .map_err(|e| e.in_context(|| format!(" of key \"{key}\"")))?;
        let value = read_value(&mut cur, ty, &key, 0)
            .map_err(|e| e.in_context(|| format!(" of key \"{key}\"")))?;
        if key_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(Error::DuplicateKey(key));
        }
        metadata.push((key, value));
    }

    let alignment = match key_index
        .get(crate::KEY_ALIGNMENT)
        .and_then(|&i| metadata.get(i))
    {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if *a != 0 => u64::from(*a),
        Some((_, v)) => return Err(Error::BadAlignment(format!("{} {v}", v.type_description()))),
    };

    cur.check_count("tensor", n_tensors, MIN_TENSOR_INFO)?;
    let mut tensors = Vec::with_capacity(preallocation(n_tensors));
    let mut tensor_index = HashMap::with_capacity(tensors.capacity());
    // Relative offsets until the data section start is known.
    let mut relative = Vec::with_capacity(tensors.capacity());
    for i in 0..n_tensors {
        let (info, rel) = read_tensor_info(&mut cur, alignment)
            .map_err(|e| e.in_context(|| format!(" of tensor {i}")))?;
        if tensor_index
            .insert(info.name.clone(), tensors.len())
            .is_some()
        {
            return Err(Error::DuplicateTensor(info.name));
        }
        tensors.push(info);
        relative.push(rel);
    }

    let data_offset = align_up(cur.offset(), alignment).ok_or_else(|| Error::Truncated {
        what: "data section",
        context: String::new(),
        offset: cur.offset(),
        need: alignment,
        len: buf.len() as u64,
    })?;
    let file_len = buf.len() as u64;
    for (info, rel) in tensors.iter_mut().zip(&relative) {
        let start = data_offset.checked_add(*rel);
        let end = start.and_then(|s| s.checked_add(info.n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => info.offset = start,
            _ => {
                return Err(Error::TensorPastEof {
                    name: info.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    len: file_len,
                });
            }
        }
    }

    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        if let [a, b] = pair {
            // Both ends were checked to fit in the file, so this cannot overflow.
            let a_end = a.offset.saturating_add(a.n_bytes);
            if b.offset < a_end {
                return Err(Error::OverlappingTensors {
                    first: a.name.clone(),
                    second: b.name.clone(),
                    first_end: a_end,
                    second_offset: b.offset,
                });
            }
        }
    }

    tracing::debug!(
        version,
        n_kv,
        n_tensors,
        alignment,
        data_offset,
        "parsed GGUF header"
    );
    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        key_index,
        tensors,
        tensor_index,
    })
}

fn read_tensor_info(cur: &mut Cursor<'_>, alignment: u64) -> Result<(TensorInfo, u64)> {
    let name = cur.string("tensor name")?;
    let ctx = |e: Error| e.in_context(|| format!(" of tensor \"{name}\""));
    let n_dims = cur.u32("tensor n_dims").map_err(ctx)?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(Error::BadDimCount { name, n_dims });
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(cur.u64("tensor dim").map_err(ctx)?);
    }
    let type_id = cur.u32("tensor type").map_err(ctx)?;
    let rel = cur.u64("tensor offset").map_err(ctx)?;
    let Some(ggml_type) = GgmlType::from_id(type_id) else {
        return Err(Error::UnknownTensorType { name, type_id });
    };
    let (n_elements, n_bytes) = tensor_extent(&name, &dims, ggml_type)?;
    if !rel.is_multiple_of(alignment) {
        return Err(Error::MisalignedTensor {
            name,
            offset: rel,
            alignment,
        });
    }
    Ok((
        TensorInfo {
            name,
            dims,
            ggml_type,
            offset: rel,
            n_bytes,
            n_elements,
        },
        rel,
    ))
}

/// Element count and byte size of a tensor, or the error saying why it has none.
pub(crate) fn tensor_extent(name: &str, dims: &[u64], ty: GgmlType) -> Result<(u64, u64)> {
    let overflow = || Error::DimsOverflow {
        name: name.to_string(),
        dims: dims.to_vec(),
    };
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    let ne0 = dims.first().copied().unwrap_or(1);
    if !ne0.is_multiple_of(ty.block_elems()) {
        return Err(Error::NotBlockMultiple {
            name: name.to_string(),
            ne0,
            ty,
            block: ty.block_elems(),
        });
    }
    let row = ty.row_bytes(ne0).ok_or_else(overflow)?;
    let n_bytes = dims
        .iter()
        .skip(1)
        .try_fold(row, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    Ok((n_elements, n_bytes))
}

/// `x` rounded up to a multiple of `align` (non-zero), or `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    let rem = x.checked_rem(align)?;
    if rem == 0 {
        Some(x)
    } else {
        x.checked_add(align - rem)
    }
}
