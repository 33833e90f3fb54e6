//! CPU backend: the reference implementation of `ds4_model::Backend`. Weights stay in the
//! file mapping (zero-copy views); activations are plain f32 matrices; rayon splits work
//! over tokens, output rows and attention heads. Float weights (F32/F16/BF16) use f32
//! activations so comparisons with float oracles stay tight.

mod matmul;

use std::cell::RefCell;
use std::sync::Mutex;

use ds4_gguf::GgmlType;
use ds4_model::backend::{Backend, CompKind, RopeKind, RowRounding};
use ds4_model::kv::{HostKv, LayerKv};
use ds4_model::numerics::{self, RopeFreqs};
use ds4_model::shape::ModelShape;
use ds4_model::weights::{CompressorWeights, FfnWeights, HcWeights, TensorView};
use ds4_model::{Error, Result};
use rayon::prelude::*;

pub use matmul::dot_row;
use matmul::{QBuf, act_kind};

/// A weight as the CPU sees it: the file view, plus a decoded f32 copy for small float
/// tensors (norms, sinks, biases, HC scale/base, ape) that are read element-wise.
#[derive(Debug, Clone)]
pub struct CpuWeight<'w> {
    pub view: TensorView<'w>,
    pub dense: Option<Vec<f32>>,
}

impl CpuWeight<'_> {
    fn dense(&self) -> Result<&[f32]> {
        self.dense.as_deref().ok_or_else(|| {
            Error::Backend(format!(
                "tensor {} is not a small float tensor",
                self.view.name
            ))
        })
    }
}

/// Row-major f32 matrix with a fixed row capacity.
#[derive(Debug, Clone)]
pub struct Mat {
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    fn rows_mut(&mut self, n: usize) -> &mut [f32] {
        &mut self.data[..n * self.cols]
    }
    fn rows(&self, n: usize) -> &[f32] {
        &self.data[..n * self.cols]
    }
    fn cap(&self) -> usize {
        self.data.len() / self.cols.max(1)
    }
}

/// Per-token selected rows (−1 = none).
#[derive(Debug, Clone)]
pub struct Sel {
    pub k: usize,
    pub data: Vec<i32>,
}

pub struct CpuBackend {
    shape: ModelShape,
    rope_plain: RopeFreqs,
    rope_comp: RopeFreqs,
    /// Quantised activations of the current matmul (allocated once, reused).
    qbuf: Mutex<QBuf>,
    /// MoE expert input and mid-vector quantisations (decode path).
    moe_q: Mutex<(QBuf, QBuf)>,
    moe_scratch: Mutex<Vec<f32>>,
}

impl CpuBackend {
    pub fn new(shape: &ModelShape) -> Self {
        Self {
            shape: shape.clone(),
            rope_plain: shape.rope_plain(),
            rope_comp: shape.rope_compress(),
            qbuf: Mutex::new(QBuf::default()),
            moe_q: Mutex::new((QBuf::default(), QBuf::default())),
            moe_scratch: Mutex::new(Vec::new()),
        }
    }
    fn qbuf(&self) -> Result<std::sync::MutexGuard<'_, QBuf>> {
        self.qbuf
            .lock()
            .map_err(|_| Error::Backend("activation buffer poisoned".into()))
    }
    fn rope_of(&self, kind: RopeKind) -> &RopeFreqs {
        match kind {
            RopeKind::Plain => &self.rope_plain,
            RopeKind::Compress => &self.rope_comp,
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a thread-local buffer of `len` floats (grown once, then reused). `f` must
/// not start parallel work (a stolen task on this thread would need the same buffer).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

fn check(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Backend(msg()))
    }
}

fn decode_small(t: &TensorView<'_>) -> Option<Vec<f32>> {
    let n: u64 = t.dims.iter().product();
    if n > 1 << 17 {
        return None;
    }
    let n = n as usize;
    let mut out = vec![0.0f32; n];
    match t.ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            matmul::decode_float_row(t.ty, t.data, &mut out).ok()?;
            Some(out)
        }
        _ => None,
    }
}

impl<'w> Backend<'w> for CpuBackend {
    type Weight = CpuWeight<'w>;
    type Act = Mat;
    type Idx = Sel;
    type Kv = HostKv;
    type HostBuf = Vec<f32>;

    fn upload(&self, t: &TensorView<'w>) -> Result<CpuWeight<'w>> {
        Ok(CpuWeight {
            view: *t,
            dense: decode_small(t),
        })
    }

    fn alloc_act(&self, rows: usize, cols: usize) -> Result<Mat> {
        Ok(Mat {
            cols,
            data: vec![0.0; rows * cols],
        })
    }

    fn alloc_idx(&self, rows: usize, k: usize) -> Result<Sel> {
        Ok(Sel {
            k,
            data: vec![-1; rows * k],
        })
    }

    fn alloc_kv(&self, shape: &ModelShape, ctx: usize) -> Result<HostKv> {
        Ok(HostKv::new(shape, ctx))
    }

    fn embed(
        &self,
        table: &CpuWeight<'w>,
        tokens: &[u32],
        hc_mult: usize,
        out: &mut Mat,
    ) -> Result<()> {
        let e = table.view.row_len();
        check(out.cols == e * hc_mult && out.cap() >= tokens.len(), || {
            "embed: bad output shape".into()
        })?;
        let row_bytes = table.view.ty.row_bytes(e as u64).unwrap_or(0) as usize;
        for (i, &t) in tokens.iter().enumerate() {
            let src = table
                .view
                .data
                .get(t as usize * row_bytes..(t as usize + 1) * row_bytes)
                .ok_or(Error::Token {
                    token: t,
                    vocab: table.view.n_rows(),
                })?;
            let row = &mut out.data[i * out.cols..(i + 1) * out.cols];
            matmul::decode_float_row(table.view.ty, src, &mut row[..e])?;
            for s in 1..hc_mult {
                row.copy_within(0..e, s * e);
            }
        }
        Ok(())
    }

    fn matmul(&self, w: &CpuWeight<'w>, x: &Mat, n: usize, out: &mut Mat) -> Result<()> {
        let (k, rows) = (w.view.row_len(), w.view.n_rows());
        check(x.cols >= k && out.cols >= rows, || {
            format!(
                "matmul {}: x {} cols, out {} cols, weight [{k}, {rows}]",
                w.view.name, x.cols, out.cols
            )
        })?;
        let mut qb = self.qbuf()?;
        matmul::matmul(&w.view, 0, rows, x, 0, k, n, out, 0, &mut qb)
    }

    fn matmul_grouped(
        &self,
        w: &CpuWeight<'w>,
        x: &Mat,
        n: usize,
        groups: usize,
        out: &mut Mat,
    ) -> Result<()> {
        let (k, rows) = (w.view.row_len(), w.view.n_rows());
        check(
            groups > 0 && rows % groups == 0 && x.cols == k * groups,
            || format!("grouped matmul {}: bad shapes", w.view.name),
        )?;
        let per = rows / groups;
        let mut qb = self.qbuf()?;
        for g in 0..groups {
            matmul::matmul(&w.view, g * per, per, x, g * k, k, n, out, g * per, &mut qb)?;
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &mut Mat,
        w: Option<&CpuWeight<'w>>,
        n: usize,
        seg: usize,
        eps: f32,
    ) -> Result<()> {
        let wd = match w {
            Some(w) => Some(w.dense()?),
            None => None,
        };
        check(
            seg > 0 && x.cols.is_multiple_of(seg) && wd.is_none_or(|w| w.len() == seg),
            || "rms_norm: bad shapes".into(),
        )?;
        x.rows_mut(n).par_chunks_mut(seg).for_each(|piece| {
            let r = numerics::rms_inv(piece, eps);
            match wd {
                Some(w) => piece
                    .iter_mut()
                    .zip(w)
                    .for_each(|(v, &g)| *v = g * (*v * r)),
                None => piece.iter_mut().for_each(|v| *v *= r),
            }
        });
        Ok(())
    }

    fn hc_pre(
        &self,
        w: &HcWeights<CpuWeight<'w>>,
        state: &Mat,
        n: usize,
        s: &ModelShape,
        y: &mut Mat,
        post: &mut Mat,
        comb: &mut Mat,
    ) -> Result<()> {
        let (hc, e, nm) = (s.hc_mult, s.n_embd, s.hc_mix());
        let scale = w.scale.dense()?;
        let base = w.base.dense()?;
        check(
            scale.len() == 3 && base.len() == nm && w.fn_.view.n_rows() == nm,
            || "hc_pre: bad weights".into(),
        )?;
        let sc = [scale[0], scale[1], scale[2]];
        let fn_ = &w.fn_.view;
        let ycols = y.cols;
        y.rows_mut(n)
            .par_chunks_mut(ycols)
            .zip(post.rows_mut(n).par_chunks_mut(hc))
            .zip(comb.rows_mut(n).par_chunks_mut(hc * hc))
            .enumerate()
            .try_for_each(|(i, ((yr, pr), cr))| -> Result<()> {
                let x = &state.data[i * state.cols..i * state.cols + hc * e];
                let r = numerics::rms_inv(x, s.rms_eps);
                let mut mixes = [0.0f32; 64];
                let mut pre = [0.0f32; 8];
                for (m, mix) in mixes.iter_mut().enumerate().take(nm) {
                    *mix = matmul::dot_row(fn_, m, x)? * r;
                }
                numerics::hc_split(
                    &mixes[..nm],
                    &sc,
                    base,
                    hc,
                    s.hc_sinkhorn_iters,
                    s.hc_eps,
                    &mut pre[..hc],
                    pr,
                    cr,
                );
                for (j, out) in yr[..e].iter_mut().enumerate() {
                    let mut acc = 0.0f32;
                    for (st, &p) in pre[..hc].iter().enumerate() {
                        acc += p * x[st * e + j];
                    }
                    *out = acc;
                }
                Ok(())
            })
    }

    fn hc_post(
        &self,
        sub: &Mat,
        post: &Mat,
        comb: &Mat,
        n: usize,
        hc: usize,
        state: &mut Mat,
    ) -> Result<()> {
        let e = sub.cols;
        check(hc <= 16 && state.cols == hc * e, || {
            "hc_post: bad shapes".into()
        })?;
        let scols = state.cols;
        state
            .rows_mut(n)
            .par_chunks_mut(scols)
            .enumerate()
            .for_each(|(i, xr)| {
                let o = &sub.data[i * e..(i + 1) * e];
                let p = &post.data[i * hc..(i + 1) * hc];
                let c = &comb.data[i * hc * hc..(i + 1) * hc * hc];
                let mut old = [0.0f32; 16];
                for j in 0..e {
                    for a in 0..hc {
                        old[a] = xr[a * e + j];
                    }
                    for d in 0..hc {
                        let mut acc = p[d] * o[j];
                        for a in 0..hc {
                            acc += c[a * hc + d] * old[a];
                        }
                        xr[d * e + j] = acc;
                    }
                }
            });
        Ok(())
    }

    fn hc_head(
        &self,
        w: &HcWeights<CpuWeight<'w>>,
        state: &Mat,
        n: usize,
        s: &ModelShape,
        out: &mut Mat,
    ) -> Result<()> {
        let (hc, e) = (s.hc_mult, s.n_embd);
        let scale = w.scale.dense()?;
        let base = w.base.dense()?;
        check(!scale.is_empty() && base.len() == hc && hc <= 16, || {
            "hc_head: bad weights".into()
        })?;
        let fn_ = &w.fn_.view;
        let ocols = out.cols;
        out.rows_mut(n)
            .par_chunks_mut(ocols)
            .enumerate()
            .try_for_each(|(i, zr)| -> Result<()> {
                let x = &state.data[i * state.cols..i * state.cols + hc * e];
                let r = numerics::rms_inv(x, s.rms_eps);
                let mut pre = [0.0f32; 16];
                for (st, p) in pre.iter_mut().enumerate().take(hc) {
                    let m = matmul::dot_row(fn_, st, x)? * r;
                    *p = numerics::sigmoid(m * scale[0] + base[st]) + s.hc_eps;
                }
                for (j, z) in zr[..e].iter_mut().enumerate() {
                    *z = (0..hc).map(|st| pre[st] * x[st * e + j]).sum();
                }
                Ok(())
            })
    }

    fn rope(
        &self,
        x: &mut Mat,
        n: usize,
        head_dim: usize,
        kind: RopeKind,
        pos0: usize,
        inverse: bool,
    ) -> Result<()> {
        check(head_dim > 0 && x.cols.is_multiple_of(head_dim), || {
            "rope: bad head dim".into()
        })?;
        let r = self.rope_of(kind);
        let cols = x.cols;
        x.rows_mut(n)
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(i, row)| {
                for head in row.chunks_mut(head_dim) {
                    r.apply(head, (pos0 + i) as u32, inverse);
                }
            });
        Ok(())
    }

    fn round_rows(&self, x: &mut Mat, n: usize, mode: RowRounding) -> Result<()> {
        let cols = x.cols;
        let n_nope = self.shape.n_nope();
        x.rows_mut(n)
            .par_chunks_mut(cols)
            .for_each(|row| match mode {
                RowRounding::KvRow => {
                    numerics::fp8_kv_round_row(row, n_nope);
                    numerics::round_f16_inplace(row);
                }
                RowRounding::IndexerQat => numerics::indexer_qat_row(row),
            });
        Ok(())
    }

    fn compressor_update(
        &self,
        kv: &mut HostKv,
        layer: usize,
        which: CompKind,
        w: &CompressorWeights<CpuWeight<'w>>,
        proj_kv: &Mat,
        proj_score: &Mat,
        n: usize,
        pos0: usize,
        official: bool,
    ) -> Result<()> {
        let l: &mut LayerKv = kv
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::Backend("layer out of range".into()))?;
        let (cache, fr) = match which {
            CompKind::Attn => (l.comp.as_mut(), l.comp_state.as_mut()),
            CompKind::Indexer => (l.index.as_mut(), l.index_state.as_mut()),
        };
        let (Some(cache), Some(fr)) = (cache, fr) else {
            return Err(Error::Backend(format!(
                "layer {layer} has no {which:?} compressor state"
            )));
        };
        let (r, coff, dc) = (fr.ratio, fr.coff, fr.d_c);
        let wdt = fr.width();
        let ape = w.ape.dense()?;
        let norm = w.norm.dense()?;
        check(
            ape.len() == r * wdt && norm.len() == dc && proj_kv.cols >= wdt,
            || format!("compressor layer {layer}: bad shapes"),
        )?;
        let n_nope = dc.saturating_sub(self.shape.n_rot);
        with_scratch(dc, |pooled| -> Result<()> {
            for i in 0..n {
                let p = pos0 + i;
                let phi = p % r;
                let rho = if coff == 2 { r + phi } else { phi };
                let kvr = &proj_kv.data[i * proj_kv.cols..i * proj_kv.cols + wdt];
                let scr = &proj_score.data[i * proj_score.cols..i * proj_score.cols + wdt];
                fr.kv[rho * wdt..(rho + 1) * wdt].copy_from_slice(kvr);
                for (j, d) in fr.score[rho * wdt..(rho + 1) * wdt].iter_mut().enumerate() {
                    *d = scr[j] + ape[phi * wdt + j];
                }
                if !(p + 1).is_multiple_of(r) {
                    continue;
                }
                for (j, out) in pooled.iter_mut().enumerate() {
                    // Candidates: (row, column) pairs.
                    let cand = |c: usize| -> (f32, f32) {
                        if coff == 2 {
                            if c < r {
                                (fr.score[c * wdt + j], fr.kv[c * wdt + j])
                            } else {
                                (fr.score[c * wdt + dc + j], fr.kv[c * wdt + dc + j])
                            }
                        } else {
                            (fr.score[c * wdt + j], fr.kv[c * wdt + j])
                        }
                    };
                    let nc = coff * r;
                    let m = (0..nc).map(|c| cand(c).0).fold(f32::NEG_INFINITY, f32::max);
                    if m == f32::NEG_INFINITY {
                        *out = 0.0;
                        continue;
                    }
                    let (mut den, mut num) = (0.0f32, 0.0f32);
                    for c in 0..nc {
                        let (sc, v) = cand(c);
                        let e = (sc - m).exp();
                        den += e;
                        num += e * v;
                    }
                    *out = num / den;
                }
                let rinv = numerics::rms_inv(pooled, self.shape.rms_eps);
                for (v, &g) in pooled.iter_mut().zip(norm) {
                    *v = g * (*v * rinv);
                }
                self.rope_comp.apply(pooled, (p + 1 - r) as u32, false);
                if official {
                    match which {
                        CompKind::Attn => numerics::fp8_kv_round_row(pooled, n_nope),
                        CompKind::Indexer => numerics::indexer_qat_row(pooled),
                    }
                    numerics::round_f16_inplace(pooled);
                }
                cache.push(pooled)?;
                if coff == 2 {
                    fr.kv.copy_within(r * wdt..2 * r * wdt, 0);
                    fr.score.copy_within(r * wdt..2 * r * wdt, 0);
                }
            }
            Ok(())
        })
    }

    fn indexer_topk(
        &self,
        kv: &HostKv,
        layer: usize,
        q: &Mat,
        weights: &Mat,
        n: usize,
        pos0: usize,
        top_k: usize,
        sel: &mut Sel,
    ) -> Result<()> {
        let l = kv
            .layers
            .get(layer)
            .ok_or_else(|| Error::Backend("layer out of range".into()))?;
        let (Some(rows), Some(fr)) = (l.index.as_ref(), l.index_state.as_ref()) else {
            return Err(Error::Backend(format!(
                "layer {layer} has no indexer state"
            )));
        };
        let r = fr.ratio;
        let dim = rows.dim;
        let heads = weights.cols;
        check(q.cols == heads * dim && sel.k >= top_k, || {
            "indexer: bad shapes".into()
        })?;
        let k = sel.k;
        sel.data[..n * k]
            .par_chunks_mut(k)
            .enumerate()
            .for_each(|(i, out)| {
                out.fill(-1);
                let p = pos0 + i;
                let visible = ((p + 1) / r).min(rows.n);
                if visible <= top_k {
                    for (c, o) in out.iter_mut().enumerate().take(visible) {
                        *o = c as i32;
                    }
                    return;
                }
                let qi = &q.data[i * q.cols..(i + 1) * q.cols];
                let wi = &weights.data[i * heads..(i + 1) * heads];
                with_scratch(visible, |scores| {
                    for (c, sc) in scores.iter_mut().enumerate() {
                        *sc = numerics::indexer_score(qi, wi, rows.row(c));
                    }
                    numerics::indexer_pick_top(scores, &mut out[..top_k]);
                });
            });
        Ok(())
    }

    fn attention(
        &self,
        kv: &HostKv,
        layer: usize,
        q: &Mat,
        rows: &Mat,
        sinks: &CpuWeight<'w>,
        sel: Option<&Sel>,
        n: usize,
        pos0: usize,
        out: &mut Mat,
    ) -> Result<()> {
        let s = &self.shape;
        let l = kv
            .layers
            .get(layer)
            .ok_or_else(|| Error::Backend("layer out of range".into()))?;
        let (hd, nh) = (s.head_dim, s.n_head);
        let sinks = sinks.dense()?;
        check(
            q.cols == nh * hd && rows.cols == hd && sinks.len() == nh,
            || "attention: bad shapes".into(),
        )?;
        let window = s.sliding_window;
        let scale = 1.0 / (hd as f32).sqrt();
        let ratio = l.kind.ratio();
        let ocols = out.cols;
        out.rows_mut(n)
            .par_chunks_mut(ocols)
            .enumerate()
            .for_each(|(i, orow)| {
                let p = pos0 + i;
                let first = (p + 1).saturating_sub(window);
                let raw_row = |t: usize| -> &[f32] {
                    if t >= pos0 {
                        &rows.data[(t - pos0) * hd..(t - pos0 + 1) * hd]
                    } else {
                        let slot = t % l.raw_cap;
                        &l.raw[slot * hd..(slot + 1) * hd]
                    }
                };
                // Compressed rows this token may use.
                let comp = l.comp.as_ref();
                let n_vis = match comp {
                    Some(c) if ratio > 0 => ((p + 1) / ratio).min(c.n),
                    _ => 0,
                };
                // The indexer writes its picks first, then −1 padding.
                let sel_row = sel.map(|sl| &sl.data[i * sl.k..(i + 1) * sl.k]);
                let n_comp_used = match sel_row {
                    Some(sr) => sr
                        .iter()
                        .take_while(|&&c| c >= 0 && (c as usize) < n_vis)
                        .count(),
                    None => n_vis,
                };
                let n_raw = p + 1 - first;
                let total = n_raw + n_comp_used;
                orow.par_chunks_mut(hd).enumerate().for_each(|(h, oh)| {
                    let qh = &q.data[i * q.cols + h * hd..i * q.cols + (h + 1) * hd];
                    with_scratch(total, |lg| {
                        let comp_row = |j: usize| -> &[f32] {
                            let idx = sel_row.map_or(j, |sr| sr[j] as usize);
                            comp.map_or(&[][..], |c| c.row(idx))
                        };
                        for (j, v) in lg.iter_mut().enumerate() {
                            let key = if j < n_raw {
                                raw_row(first + j)
                            } else {
                                comp_row(j - n_raw)
                            };
                            *v = qh.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * scale;
                        }
                        let m = lg.iter().copied().fold(sinks[h], f32::max);
                        let mut den = (sinks[h] - m).exp();
                        for v in lg.iter_mut() {
                            *v = (*v - m).exp();
                            den += *v;
                        }
                        oh.fill(0.0);
                        for (j, &wgt) in lg.iter().enumerate() {
                            let val = if j < n_raw {
                                raw_row(first + j)
                            } else {
                                comp_row(j - n_raw)
                            };
                            let wn = wgt / den;
                            for (o, &v) in oh.iter_mut().zip(val) {
                                *o += wn * v;
                            }
                        }
                    });
                });
            });
        Ok(())
    }

    fn kv_append_raw(
        &self,
        kv: &mut HostKv,
        layer: usize,
        rows: &Mat,
        n: usize,
        pos0: usize,
    ) -> Result<()> {
        let hd = kv.head_dim;
        let l = kv
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::Backend("layer out of range".into()))?;
        let start = n.saturating_sub(l.raw_cap);
        for i in start..n {
            let slot = (pos0 + i) % l.raw_cap;
            l.raw[slot * hd..(slot + 1) * hd].copy_from_slice(&rows.data[i * hd..(i + 1) * hd]);
        }
        Ok(())
    }

    fn moe(
        &self,
        w: &FfnWeights<CpuWeight<'w>>,
        layer: usize,
        s: &ModelShape,
        x: &Mat,
        tokens: &[u32],
        n: usize,
        out: &mut Mat,
    ) -> Result<()> {
        check(
            s.n_expert_used <= 64
                && x.cols >= s.n_embd
                && out.cols >= s.n_embd
                && tokens.len() >= n,
            || "moe: bad shapes".into(),
        )?;
        let ocols = out.cols;
        if n == 1 {
            // Decode: one token, the parallelism is inside the expert matvecs.
            let mut guard = self
                .moe_q
                .lock()
                .map_err(|_| Error::Backend("moe buffer poisoned".into()))?;
            let (qin, qmid) = &mut *guard;
            let mut scratch = self
                .moe_scratch
                .lock()
                .map_err(|_| Error::Backend("moe buffer poisoned".into()))?;
            return moe_token(
                w,
                layer,
                s,
                &x.data[..x.cols],
                tokens[0],
                &mut out.data[..ocols],
                qin,
                qmid,
                &mut scratch,
                true,
            );
        }
        // Prefill: tokens in parallel, each token's experts on one thread.
        out.rows_mut(n)
            .par_chunks_mut(ocols)
            .enumerate()
            .try_for_each(|(i, orow)| {
                MOE_LOCAL.with(|cell| {
                    let mut local = cell.borrow_mut();
                    let (qin, qmid, scratch) = &mut *local;
                    moe_token(
                        w,
                        layer,
                        s,
                        &x.data[i * x.cols..(i + 1) * x.cols],
                        tokens[i],
                        orow,
                        qin,
                        qmid,
                        scratch,
                        false,
                    )
                })
            })
    }

    fn copy_row(&self, src: &Mat, src_row: usize, dst: &mut Mat, dst_row: usize) -> Result<()> {
        let c = src.cols;
        check(
            dst.cols == c && src_row < src.cap() && dst_row < dst.cap(),
            || "copy_row: bad shapes".into(),
        )?;
        dst.data[dst_row * c..(dst_row + 1) * c]
            .copy_from_slice(&src.data[src_row * c..(src_row + 1) * c]);
        Ok(())
    }

    fn read_rows(&self, x: &Mat, n: usize, out: &mut [f32]) -> Result<()> {
        let src = x.rows(n);
        check(out.len() >= src.len(), || {
            "read_rows: output too small".into()
        })?;
        out[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn alloc_host(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
}

thread_local! {
    static MOE_LOCAL: RefCell<(QBuf, QBuf, Vec<f32>)> = RefCell::new((QBuf::default(), QBuf::default(), Vec::new()));
}

/// Router + routed experts + shared expert for one token (model.md §7.4 steps 3–7).
#[allow(clippy::too_many_arguments)]
fn moe_token(
    w: &FfnWeights<CpuWeight<'_>>,
    layer: usize,
    s: &ModelShape,
    xi: &[f32],
    token: u32,
    oi: &mut [f32],
    qin: &mut QBuf,
    qmid: &mut QBuf,
    scratch: &mut Vec<f32>,
    par: bool,
) -> Result<()> {
    let (e, ff, ne, k) = (s.n_embd, s.n_ff_exp, s.n_expert, s.n_expert_used);
    let xi = &xi[..e];
    let oi = &mut oi[..e];
    let clamp = s.swiglu_clamp.get(layer).copied().unwrap_or(f32::INFINITY);
    let bias = match &w.bias {
        Some(b) => Some(b.dense()?),
        None => None,
    };
    let need = 2 * ne + 2 * ff + e;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (score, rest) = scratch.split_at_mut(ne);
    let (biased, rest) = rest.split_at_mut(ne);
    let (g, rest) = rest.split_at_mut(ff);
    let (u, rest) = rest.split_at_mut(ff);
    let d = &mut rest[..e];
    // Router: s = sqrt(softplus(logit)).
    for (ex, sc) in score.iter_mut().enumerate() {
        let l = matmul::dot_row(&w.router.view, ex, xi)?;
        *sc = numerics::softplus(l).sqrt();
    }
    let mut ids = [0usize; 64];
    let mut wts = [0.0f32; 64];
    if let Some(t2e) = &w.tid2eid {
        let t = token as usize;
        for (j, id) in ids.iter_mut().enumerate().take(k) {
            let off = (t * k + j) * 4;
            let b = t2e
                .view
                .data
                .get(off..off + 4)
                .ok_or_else(|| Error::Backend("tid2eid out of range".into()))?;
            let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            *id = usize::try_from(v)
                .ok()
                .filter(|&v| v < ne)
                .ok_or_else(|| Error::Backend(format!("tid2eid expert {v} out of range")))?;
        }
    } else {
        for (ex, b) in biased.iter_mut().enumerate() {
            *b = score[ex] + bias.map_or(0.0, |bb| bb[ex]);
        }
        // Top-k, lower index first on ties.
        for id in ids.iter_mut().take(k) {
            let mut best = 0usize;
            let mut best_v = f32::NEG_INFINITY;
            for (ex, &v) in biased.iter().enumerate() {
                if v > best_v {
                    best = ex;
                    best_v = v;
                }
            }
            *id = best;
            biased[best] = f32::NEG_INFINITY;
        }
    }
    let sum: f32 = ids[..k].iter().map(|&id| score[id]).sum();
    for j in 0..k {
        wts[j] = if s.expert_weights_norm {
            s.expert_weights_scale * score[ids[j]] / sum.max(6.103_515_6e-5)
        } else {
            s.expert_weights_scale * score[ids[j]]
        };
    }
    oi.fill(0.0);
    // Routed experts (weight applied to the mid vector, as ds4), then the shared expert.
    for j in 0..=k {
        let (gate, up, down, row0g, row0d, wt) = if j < k {
            (
                &w.gate_exps.view,
                &w.up_exps.view,
                &w.down_exps.view,
                ids[j] * ff,
                ids[j] * e,
                wts[j],
            )
        } else {
            (&w.gate_sh.view, &w.up_sh.view, &w.down_sh.view, 0, 0, 1.0)
        };
        let kin = act_kind(gate.ty)?;
        qin.quantize_vec(kin, xi)?;
        matmul::matvec(gate, row0g, ff, qin.view(kin, xi), g, par)?;
        matmul::matvec(up, row0g, ff, qin.view(kin, xi), u, par)?;
        for (gv, &uv) in g.iter_mut().zip(u.iter()) {
            let gc = gv.min(clamp);
            let uc = uv.clamp(-clamp, clamp);
            *gv = wt * numerics::silu(gc) * uc;
        }
        let kd = act_kind(down.ty)?;
        qmid.quantize_vec(kd, g)?;
        matmul::matvec(down, row0d, e, qmid.view(kd, g), d, par)?;
        for (o, &v) in oi.iter_mut().zip(d.iter()) {
            *o += v;
        }
    }
    Ok(())
}
