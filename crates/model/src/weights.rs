//! Weights bound zero-copy to the file: every tensor the forward pass reads, by layer, with
//! its type and dims checked against the model shape. The structs are generic over the
//! handle type so a backend can map host views to device-resident handles once
//! (`ModelWeights::try_map`).

use ds4_gguf::GgmlType;

use crate::shape::{LayerKind, ModelShape};
use crate::{Error, Result};

/// A tensor as stored: element type, ggml dims (ne0 first) and its raw bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub ty: GgmlType,
    pub dims: &'a [u64],
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Row length (ne0) and number of rows (product of the other dims).
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }
}

/// Anything that can hand out tensors by name (a GGUF file, an in-memory table in tests).
pub trait TensorSource {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>>;
}

impl TensorSource for ds4_gguf::GgufFile {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let info = ds4_gguf::GgufFile::tensor(self, name)?;
        Some(TensorView {
            name: &info.name,
            ty: info.ggml_type,
            dims: &info.dims,
            data: self.tensor_data(info),
        })
    }
}

#[derive(Debug, Clone)]
pub struct HcWeights<W> {
    /// [hc_dim, mix] (F16/F32): mix rows of hc_dim inputs.
    pub fn_: W,
    pub scale: W,
    pub base: W,
}

#[derive(Debug, Clone)]
pub struct CompressorWeights<W> {
    pub ape: W,
    pub kv: W,
    pub gate: W,
    pub norm: W,
}

#[derive(Debug, Clone)]
pub struct IndexerWeights<W> {
    pub q_b: W,
    pub proj: W,
    pub compressor: CompressorWeights<W>,
}

#[derive(Debug, Clone)]
pub struct AttnWeights<W> {
    pub norm: W,
    pub q_a: W,
    pub q_a_norm: W,
    pub q_b: W,
    pub kv: W,
    pub kv_norm: W,
    pub sinks: W,
    pub out_a: W,
    pub out_b: W,
    pub compressor: Option<CompressorWeights<W>>,
    pub indexer: Option<IndexerWeights<W>>,
}

#[derive(Debug, Clone)]
pub struct FfnWeights<W> {
    pub norm: W,
    pub router: W,
    pub bias: Option<W>,
    /// [n_expert_used, vocab] I32, hash layers only.
    pub tid2eid: Option<W>,
    pub gate_exps: W,
    pub up_exps: W,
    pub down_exps: W,
    pub gate_sh: W,
    pub up_sh: W,
    pub down_sh: W,
}

#[derive(Debug, Clone)]
pub struct LayerWeights<W> {
    pub kind: LayerKind,
    pub hc_attn: HcWeights<W>,
    pub attn: AttnWeights<W>,
    pub hc_ffn: HcWeights<W>,
    pub ffn: FfnWeights<W>,
}

#[derive(Debug, Clone)]
pub struct ModelWeights<W> {
    pub token_embd: W,
    pub output: W,
    pub output_norm: W,
    pub hc_head: HcWeights<W>,
    pub layers: Vec<LayerWeights<W>>,
}

const FLOAT: &[GgmlType] = &[GgmlType::F32, GgmlType::F16, GgmlType::BF16];
const F32_ONLY: &[GgmlType] = &[GgmlType::F32];
const MATRIX: &[GgmlType] = &[GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0];
const EXPERT: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
];

struct Binder<'a, S: TensorSource + ?Sized> {
    src: &'a S,
}

impl<'a, S: TensorSource + ?Sized> Binder<'a, S> {
    fn get(&self, name: &str, dims: &[usize], types: &[GgmlType]) -> Result<TensorView<'a>> {
        let t = self
            .src
            .tensor(name)
            .ok_or_else(|| Error::Weights(format!("missing tensor {name}")))?;
        self.check(t, name, dims, types)?;
        Ok(t)
    }

    fn opt(
        &self,
        name: &str,
        dims: &[usize],
        types: &[GgmlType],
    ) -> Result<Option<TensorView<'a>>> {
        match self.src.tensor(name) {
            None => Ok(None),
            Some(t) => self.check(t, name, dims, types).map(|()| Some(t)),
        }
    }

    fn check(
        &self,
        t: TensorView<'a>,
        name: &str,
        dims: &[usize],
        types: &[GgmlType],
    ) -> Result<()> {
        let got: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        // Trailing 1-dims are equivalent ([n] == [n, 1]).
        let trim = |v: &[usize]| {
            let mut v = v.to_vec();
            while v.len() > 1 && v.last() == Some(&1) {
                v.pop();
            }
            v
        };
        if trim(&got) != trim(dims) {
            return Err(Error::Weights(format!(
                "tensor {name}: dims {got:?}, expected {dims:?}"
            )));
        }
        if !types.contains(&t.ty) {
            return Err(Error::Weights(format!(
                "tensor {name}: type {:?} not accepted here (accepted: {types:?})",
                t.ty
            )));
        }
        let n: u64 = t.dims.iter().product();
        let row = t.ty.row_bytes(t.dims.first().copied().unwrap_or(1));
        let want = row.map(|r| r * (n / t.dims.first().copied().unwrap_or(1).max(1)));
        if want != Some(t.data.len() as u64) {
            return Err(Error::Weights(format!(
                "tensor {name}: {} bytes, expected {want:?}",
                t.data.len()
            )));
        }
        Ok(())
    }
}

impl<'a> ModelWeights<TensorView<'a>> {
    /// Binds and validates every tensor the shape needs. Errors name the tensor.
    pub fn bind<S: TensorSource + ?Sized>(src: &'a S, s: &ModelShape) -> Result<Self> {
        s.validate().map_err(Error::Config)?;
        let b = Binder { src };
        let (e, hc, mix) = (s.n_embd, s.hc_dim(), s.hc_mix());
        let hc_w =
            |prefix: &str, n_mix: usize, n_scale: usize| -> Result<HcWeights<TensorView<'a>>> {
                Ok(HcWeights {
                    fn_: b.get(&format!("{prefix}_fn.weight"), &[hc, n_mix], FLOAT)?,
                    scale: b.get(&format!("{prefix}_scale.weight"), &[n_scale], F32_ONLY)?,
                    base: b.get(&format!("{prefix}_base.weight"), &[n_mix], F32_ONLY)?,
                })
            };
        let mut layers = Vec::with_capacity(s.n_layer);
        for (il, &kind) in s.layer_kinds.iter().enumerate() {
            let p = format!("blk.{il}.");
            let n = |x: &str| format!("{p}{x}");
            let compressor = if kind.is_compressed() {
                let w = kind.coff() * s.head_dim;
                Some(CompressorWeights {
                    ape: b.get(&n("attn_compressor_ape.weight"), &[w, kind.ratio()], FLOAT)?,
                    kv: b.get(&n("attn_compressor_kv.weight"), &[e, w], FLOAT)?,
                    gate: b.get(&n("attn_compressor_gate.weight"), &[e, w], FLOAT)?,
                    norm: b.get(&n("attn_compressor_norm.weight"), &[s.head_dim], F32_ONLY)?,
                })
            } else {
                None
            };
            let indexer = if kind.is_csa() {
                let w = 2 * s.indexer_dim;
                Some(IndexerWeights {
                    q_b: b.get(
                        &n("indexer.attn_q_b.weight"),
                        &[s.q_lora_rank, s.indexer_heads * s.indexer_dim],
                        MATRIX,
                    )?,
                    proj: b.get(&n("indexer.proj.weight"), &[e, s.indexer_heads], MATRIX)?,
                    compressor: CompressorWeights {
                        ape: b.get(
                            &n("indexer_compressor_ape.weight"),
                            &[w, kind.ratio()],
                            FLOAT,
                        )?,
                        kv: b.get(&n("indexer_compressor_kv.weight"), &[e, w], FLOAT)?,
                        gate: b.get(&n("indexer_compressor_gate.weight"), &[e, w], FLOAT)?,
                        norm: b.get(
                            &n("indexer_compressor_norm.weight"),
                            &[s.indexer_dim],
                            F32_ONLY,
                        )?,
                    },
                })
            } else {
                None
            };
            let group_in = s.q_dim() / s.o_groups;
            let low = s.o_groups * s.o_lora_rank;
            let attn = AttnWeights {
                norm: b.get(&n("attn_norm.weight"), &[e], F32_ONLY)?,
                q_a: b.get(&n("attn_q_a.weight"), &[e, s.q_lora_rank], MATRIX)?,
                q_a_norm: b.get(&n("attn_q_a_norm.weight"), &[s.q_lora_rank], F32_ONLY)?,
                q_b: b.get(&n("attn_q_b.weight"), &[s.q_lora_rank, s.q_dim()], MATRIX)?,
                kv: b.get(&n("attn_kv.weight"), &[e, s.head_dim], MATRIX)?,
                kv_norm: b.get(&n("attn_kv_a_norm.weight"), &[s.head_dim], F32_ONLY)?,
                sinks: b.get(&n("attn_sinks.weight"), &[s.n_head], F32_ONLY)?,
                out_a: b.get(&n("attn_output_a.weight"), &[group_in, low], MATRIX)?,
                out_b: b.get(&n("attn_output_b.weight"), &[low, e], MATRIX)?,
                compressor,
                indexer,
            };
            let (ne, ff) = (s.n_expert, s.n_ff_exp);
            let hash = s.is_hash_layer(il);
            let gate_exps = b.get(&n("ffn_gate_exps.weight"), &[e, ff, ne], EXPERT)?;
            let up_exps = b.get(&n("ffn_up_exps.weight"), &[e, ff, ne], EXPERT)?;
            if gate_exps.ty != up_exps.ty {
                return Err(Error::Weights(format!(
                    "tensor {p}ffn_up_exps.weight: type {:?} differs from gate {:?}",
                    up_exps.ty, gate_exps.ty
                )));
            }
            let ffn = FfnWeights {
                norm: b.get(&n("ffn_norm.weight"), &[e], F32_ONLY)?,
                router: b.get(&n("ffn_gate_inp.weight"), &[e, ne], FLOAT)?,
                bias: b.opt(&n("exp_probs_b.bias"), &[ne], F32_ONLY)?,
                tid2eid: if hash {
                    Some(b.get(
                        &n("ffn_gate_tid2eid.weight"),
                        &[s.n_expert_used, s.vocab],
                        &[GgmlType::I32],
                    )?)
                } else {
                    None
                },
                gate_exps,
                up_exps,
                down_exps: b.get(&n("ffn_down_exps.weight"), &[ff, e, ne], EXPERT)?,
                gate_sh: b.get(&n("ffn_gate_shexp.weight"), &[e, ff], MATRIX)?,
                up_sh: b.get(&n("ffn_up_shexp.weight"), &[e, ff], MATRIX)?,
                down_sh: b.get(&n("ffn_down_shexp.weight"), &[ff, e], MATRIX)?,
            };
            if let Some(t) = ffn.tid2eid {
                let bad = t
                    .data
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .find(|&v| v < 0 || v as usize >= ne);
                if let Some(v) = bad {
                    return Err(Error::Weights(format!(
                        "tensor {p}ffn_gate_tid2eid.weight: expert id {v} out of range 0..{ne}"
                    )));
                }
            }
            layers.push(LayerWeights {
                kind,
                hc_attn: hc_w(&n("hc_attn"), mix, 3)?,
                attn,
                hc_ffn: hc_w(&n("hc_ffn"), mix, 3)?,
                ffn,
            });
        }
        Ok(ModelWeights {
            token_embd: b.get("token_embd.weight", &[e, s.vocab], FLOAT)?,
            output: b.get("output.weight", &[e, s.vocab], MATRIX)?,
            output_norm: b.get("output_norm.weight", &[e], F32_ONLY)?,
            hc_head: hc_w("output_hc", s.hc_mult, 1)?,
            layers,
        })
    }
}

impl<W> HcWeights<W> {
    fn try_map<V, E>(
        &self,
        f: &mut impl FnMut(&W) -> std::result::Result<V, E>,
    ) -> std::result::Result<HcWeights<V>, E> {
        Ok(HcWeights {
            fn_: f(&self.fn_)?,
            scale: f(&self.scale)?,
            base: f(&self.base)?,
        })
    }
}

impl<W> CompressorWeights<W> {
    fn try_map<V, E>(
        &self,
        f: &mut impl FnMut(&W) -> std::result::Result<V, E>,
    ) -> std::result::Result<CompressorWeights<V>, E> {
        Ok(CompressorWeights {
            ape: f(&self.ape)?,
            kv: f(&self.kv)?,
            gate: f(&self.gate)?,
            norm: f(&self.norm)?,
        })
    }
}

impl<W> ModelWeights<W> {
    /// Maps every handle (e.g. host view → device buffer), keeping the structure.
    pub fn try_map<V, E>(
        &self,
        mut f: impl FnMut(&W) -> std::result::Result<V, E>,
    ) -> std::result::Result<ModelWeights<V>, E> {
        let f = &mut f;
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let a = &l.attn;
            let attn = AttnWeights {
                norm: f(&a.norm)?,
                q_a: f(&a.q_a)?,
                q_a_norm: f(&a.q_a_norm)?,
                q_b: f(&a.q_b)?,
                kv: f(&a.kv)?,
                kv_norm: f(&a.kv_norm)?,
                sinks: f(&a.sinks)?,
                out_a: f(&a.out_a)?,
                out_b: f(&a.out_b)?,
                compressor: a.compressor.as_ref().map(|c| c.try_map(f)).transpose()?,
                indexer: match &a.indexer {
                    None => None,
                    Some(ix) => Some(IndexerWeights {
                        q_b: f(&ix.q_b)?,
                        proj: f(&ix.proj)?,
                        compressor: ix.compressor.try_map(f)?,
                    }),
                },
            };
            let m = &l.ffn;
            let ffn = FfnWeights {
                norm: f(&m.norm)?,
                router: f(&m.router)?,
                bias: m.bias.as_ref().map(&mut *f).transpose()?,
                tid2eid: m.tid2eid.as_ref().map(&mut *f).transpose()?,
                gate_exps: f(&m.gate_exps)?,
                up_exps: f(&m.up_exps)?,
                down_exps: f(&m.down_exps)?,
                gate_sh: f(&m.gate_sh)?,
                up_sh: f(&m.up_sh)?,
                down_sh: f(&m.down_sh)?,
            };
            layers.push(LayerWeights {
                kind: l.kind,
                hc_attn: l.hc_attn.try_map(f)?,
                attn,
                hc_ffn: l.hc_ffn.try_map(f)?,
                ffn,
            });
        }
        Ok(ModelWeights {
            token_embd: f(&self.token_embd)?,
            output: f(&self.output)?,
            output_norm: f(&self.output_norm)?,
            hc_head: self.hc_head.try_map(f)?,
            layers,
        })
    }
}
