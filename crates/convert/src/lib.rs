//! Hugging Face DeepseekV4 checkpoint → ds4 Flash GGUF.
//!
//! Reads `config.json`, the safetensors shards (official DeepSeek tensor names, as
//! transformers' `save_pretrained` writes them; F32/F16/BF16 floats, I64 `tid2eid`) and
//! `tokenizer.json` of a directory, and writes the tensor names, dims and metadata keys
//! of the published GGUF files (model.md §4.2–4.3). Output types:
//!
//! * `f32` / `f16`: that float type wherever the published files have a quantized type;
//! * `q8_0`: Q8_0 where published (attention, shared expert, head) and for the experts;
//! * `q2`: the published q2 types, except that routed gate/up are Q2_K instead of IQ2_XXS
//!   (no IQ2_XXS quantizer yet; the report says so);
//! * `q4`: Q4_K routed experts.
//!
//! Tensors published as F16 (embedding, HC, compressors, indexer, router) stay F16 and
//! F32 ones (norms, sinks, biases) stay F32 in every mode; `tid2eid` is narrowed to I32.
//! The file is written to a temporary name and renamed, so an error never leaves a
//! half-written output.

mod config;
mod error;
mod metadata;
mod plan;
mod source;
mod vocab;

use std::path::{Path, PathBuf};

use ds4_gguf::{GgmlType, GgufWriter};

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use metadata::{Meta, metadata};
pub use plan::{Class, PlannedTensor, Source, plan};
pub use source::Checkpoint;
pub use vocab::Vocab;

/// The `--type` of a conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutType {
    F32,
    F16,
    Q8_0,
    Q2,
    Q4,
}

impl OutType {
    pub const ALL: [OutType; 5] = [
        OutType::F32,
        OutType::F16,
        OutType::Q8_0,
        OutType::Q2,
        OutType::Q4,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OutType::F32 => "f32",
            OutType::F16 => "f16",
            OutType::Q8_0 => "q8_0",
            OutType::Q2 => "q2",
            OutType::Q4 => "q4",
        }
    }
}

impl std::str::FromStr for OutType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        OutType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown type {s:?}; expected one of f32, f16, q8_0, q2, q4"))
    }
}

impl std::fmt::Display for OutType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    pub out_type: OutType,
    /// `general.name`; the checkpoint directory's name when `None`.
    pub name: Option<String>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            out_type: OutType::F16,
            name: None,
        }
    }
}

/// Progress events, for a progress bar.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress<'a> {
    /// Conversion starts: this many tensors holding this many elements.
    Start { tensors: usize, elements: u64 },
    /// A tensor is done.
    Tensor {
        index: usize,
        name: &'a str,
        ty: GgmlType,
        elements: u64,
    },
    /// All tensors are converted; the file is being written.
    Writing { path: &'a Path, bytes: u64 },
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// The file written (`None` for [`convert_hf_to_bytes`]).
    pub output: Option<PathBuf>,
    pub tensors: usize,
    pub tensor_bytes: u64,
    /// (GGUF type, number of tensors of that type), by type id.
    pub types: Vec<(GgmlType, usize)>,
    /// Things the user must know (substituted types, padded vocab, missing optional tensors).
    pub notes: Vec<String>,
}

/// Converts the checkpoint in `dir` to a GGUF file at `out`.
pub fn convert_hf(dir: &Path, out: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    convert_hf_with_progress(dir, out, opts, &mut |_| {})
}

/// [`convert_hf`], reporting progress through `progress`.
pub fn convert_hf_with_progress(
    dir: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<ConvertReport> {
    let (writer, mut report) = build(dir, opts, progress)?;
    progress(Progress::Writing {
        path: out,
        bytes: report.tensor_bytes,
    });
    writer.write_file(out)?;
    report.output = Some(out.to_path_buf());
    Ok(report)
}

/// [`convert_hf`] into memory: the complete GGUF file as bytes (for tests and tools that
/// load the result with `GgufFile::from_bytes`).
pub fn convert_hf_to_bytes(dir: &Path, opts: &ConvertOptions) -> Result<(Vec<u8>, ConvertReport)> {
    let (writer, report) = build(dir, opts, &mut |_| {})?;
    let mut bytes = Vec::new();
    writer.write_to(&mut bytes)?;
    Ok((bytes, report))
}

/// Reads and encodes everything; returns the filled writer.
fn build(
    dir: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(GgufWriter, ConvertReport)> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let vocab = Vocab::from_file(&dir.join("tokenizer.json"), cfg.vocab_size)?;
    let ckpt = Checkpoint::open(dir)?;
    let name = opts.name.clone().unwrap_or_else(|| {
        dir.canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "DeepSeek-V4-Flash".to_string())
    });

    let mut notes = Vec::new();
    if opts.out_type == OutType::Q2 {
        let note = "q2: routed gate/up experts written as Q2_K, not IQ2_XXS as in the published \
                    q2 file (no IQ2_XXS quantizer yet); down experts are Q2_K as published";
        tracing::warn!("{note}");
        notes.push(note.to_string());
    }
    if vocab.padded > 0 {
        let note = format!(
            "tokenizer.json defines {} of {} ids; the rest are [PAD<id>] tokens",
            cfg.vocab_size as usize - vocab.padded,
            cfg.vocab_size
        );
        tracing::warn!("{note}");
        notes.push(note);
    }

    let mut writer = GgufWriter::new();
    for (key, value) in metadata(&cfg, &vocab, &name) {
        writer.add_kv(&key, value.into_gguf());
    }

    let table = plan(&cfg);
    let elements = table.iter().map(PlannedTensor::n_elements).sum();
    progress(Progress::Start {
        tensors: table.len(),
        elements,
    });
    let mut tensor_bytes = 0u64;
    let mut written = 0usize;
    let mut types: Vec<(GgmlType, usize)> = Vec::new();
    for (index, t) in table.iter().enumerate() {
        let ty = t.class.ggml_type(opts.out_type);
        let Some(bytes) = tensor_bytes_for(&ckpt, &cfg, t, ty)? else {
            let note = format!("optional tensor {} absent from the checkpoint", t.name);
            tracing::info!("{note}");
            notes.push(note);
            continue;
        };
        tensor_bytes += bytes.len() as u64;
        writer.add_tensor(&t.name, &t.dims, ty, bytes)?;
        written += 1;
        match types.iter_mut().find(|(k, _)| *k == ty) {
            Some((_, n)) => *n += 1,
            None => types.push((ty, 1)),
        }
        progress(Progress::Tensor {
            index,
            name: &t.name,
            ty,
            elements: t.n_elements(),
        });
    }
    types.sort_by_key(|(t, _)| t.id());
    let report = ConvertReport {
        output: None,
        tensors: written,
        tensor_bytes,
        types,
        notes,
    };
    Ok((writer, report))
}

/// The encoded bytes of one planned tensor, or `None` for an absent optional tensor.
fn tensor_bytes_for(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    t: &PlannedTensor,
    ty: GgmlType,
) -> Result<Option<Vec<u8>>> {
    match &t.source {
        Source::Tensor { candidates, shape } => {
            let Some(src) = ckpt.find(candidates) else {
                if t.optional {
                    return Ok(None);
                }
                return Err(Error::MissingTensor {
                    name: t.name.clone(),
                    candidates: candidates.join(", "),
                });
            };
            if t.class == Class::TokenToExpert {
                let ids = ckpt.read_int(src, shape)?;
                return narrow_expert_ids(&t.name, &ids, cfg.n_expert).map(Some);
            }
            let data = ckpt.read_f32(src, shape)?;
            encode(&t.name, &data, t.dims.first().copied().unwrap_or(1), ty).map(Some)
        }
        Source::Experts {
            layer,
            which,
            n_expert,
            shape,
        } => {
            let mut out = Vec::new();
            for e in 0..*n_expert {
                let candidates = Source::expert_candidates(*layer, which, e);
                let src = ckpt.find(&candidates).ok_or_else(|| Error::MissingTensor {
                    name: format!("{} (expert {e})", t.name),
                    candidates: candidates.join(", "),
                })?;
                let data = ckpt.read_f32(src, shape)?;
                out.extend(encode(
                    &t.name,
                    &data,
                    t.dims.first().copied().unwrap_or(1),
                    ty,
                )?);
            }
            Ok(Some(out))
        }
    }
}

/// `tid2eid`: I64 expert ids, each checked to be < n_expert, as little-endian I32.
fn narrow_expert_ids(name: &str, ids: &[i64], n_expert: u32) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(ids.len() * 4);
    for (i, &id) in ids.iter().enumerate() {
        if id < 0 || id >= i64::from(n_expert) {
            return Err(Error::BadValue {
                name: name.to_string(),
                problem: format!("entry {i} is expert {id}, not in 0..{n_expert}"),
            });
        }
        out.extend_from_slice(&(id as i32).to_le_bytes());
    }
    Ok(out)
}

/// Encodes f32 data with rows of `row_len` elements as `ty`.
fn encode(name: &str, data: &[f32], row_len: u64, ty: GgmlType) -> Result<Vec<u8>> {
    match ty {
        GgmlType::F32 => Ok(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::F16 => Ok(data
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect()),
        _ => {
            let row = row_len as usize;
            let block = ty.block_elems() as usize;
            if row == 0 || !row.is_multiple_of(block) {
                return Err(Error::Unsupported {
                    name: name.to_string(),
                    ty: ty.name(),
                    problem: format!(
                        "rows of {row} elements are not a whole number of {block}-element blocks"
                    ),
                });
            }
            let mut out = Vec::with_capacity(ty.row_bytes(data.len() as u64).unwrap_or(0) as usize);
            for r in data.chunks(row) {
                let q = ds4_quant::quantize_row(ty, r).map_err(|source| Error::Quant {
                    name: name.to_string(),
                    source,
                })?;
                out.extend_from_slice(&q);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn out_type_parses() {
        for t in OutType::ALL {
            assert_eq!(t.name().parse::<OutType>(), Ok(t));
        }
        assert_eq!("Q8_0".parse::<OutType>(), Ok(OutType::Q8_0));
        assert!("q3".parse::<OutType>().is_err());
    }

    #[test]
    fn expert_ids_are_range_checked() {
        assert_eq!(
            narrow_expert_ids("t", &[0, 3], 4).unwrap(),
            [0i32.to_le_bytes(), 3i32.to_le_bytes()].concat()
        );
        let e = narrow_expert_ids("t", &[1, 4], 4).unwrap_err().to_string();
        assert!(e.contains("entry 1 is expert 4"), "{e}");
        assert!(narrow_expert_ids("t", &[-1], 4).is_err());
    }

    #[test]
    fn quantized_rows_must_fill_blocks() {
        let e = encode("x", &[0.0; 64], 64, GgmlType::Q2_K)
            .unwrap_err()
            .to_string();
        assert!(e.contains("256-element blocks"), "{e}");
        assert_eq!(encode("x", &[1.5; 4], 2, GgmlType::F16).unwrap().len(), 8);
    }
}
