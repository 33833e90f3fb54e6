//! Read-only access to the safetensors files of a checkpoint directory (mmap, any
//! number of shards), with conversion of float tensors to f32.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    len: usize,
}

/// All tensors of all `*.safetensors` files of a directory.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Error::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for path in paths {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the checkpoint is opened read-only and is not expected to change
            // while we convert it (as for any mmap-based model loader).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let index = files.len();
            {
                let st = SafeTensors::deserialize(&map).map_err(|e| Error::Safetensors {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                let base = map.as_ptr() as usize;
                for (name, view) in st.iter() {
                    let data = view.data();
                    entries.insert(
                        name.to_string(),
                        Entry {
                            file: index,
                            dtype: view.dtype(),
                            shape: view.shape().to_vec(),
                            start: data.as_ptr() as usize - base,
                            len: data.len(),
                        },
                    );
                }
            }
            files.push((path, map));
        }
        Ok(Checkpoint { files, entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The first of `candidates` present in the checkpoint.
    pub fn find<'c>(&self, candidates: &'c [String]) -> Option<&'c str> {
        candidates
            .iter()
            .map(String::as_str)
            .find(|c| self.entries.contains_key(*c))
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    fn entry(&self, name: &str, expect_shape: &[usize]) -> Result<(&Entry, &[u8])> {
        let entry = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            candidates: name.to_string(),
        })?;
        if entry.shape != expect_shape {
            return Err(Error::BadShape {
                name: name.to_string(),
                expected: expect_shape.to_vec(),
                got: entry.shape.clone(),
            });
        }
        let bytes = self
            .files
            .get(entry.file)
            .and_then(|(_, map)| map.get(entry.start..entry.start + entry.len))
            .ok_or_else(|| Error::BadValue {
                name: name.to_string(),
                problem: "data lies outside its file".into(),
            })?;
        Ok((entry, bytes))
    }

    /// The tensor as f32 (from F32, F16 or BF16), checked against `expect_shape`.
    pub fn read_f32(&self, name: &str, expect_shape: &[usize]) -> Result<Vec<f32>> {
        let (entry, bytes) = self.entry(name, expect_shape)?;
        let out = match entry.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::BadDtype {
                    name: name.to_string(),
                    dtype: format!(
                        "{other:?} (float tensors must be F32, F16 or BF16; FP8/FP4 weights \
                         must be dequantised to one of these first)"
                    ),
                });
            }
        };
        Ok(out)
    }

    /// An integer tensor (I64 or I32) as i64, checked against `expect_shape`.
    pub fn read_int(&self, name: &str, expect_shape: &[usize]) -> Result<Vec<i64>> {
        let (entry, bytes) = self.entry(name, expect_shape)?;
        let out = match entry.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            other => {
                return Err(Error::BadDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?} (expected I64 or I32)"),
                });
            }
        };
        Ok(out)
    }
}
