//! Host-memory KV state (model.md §11–§12): per layer a raw sliding ring, the compressed
//! attention rows, the indexer rows and the compressor frontiers (kv + score, with the CSA
//! previous/current halves). Sized for a context once; never grows.

use crate::backend::KvStore;
use crate::shape::{LayerKind, ModelShape};
use crate::{Error, Result};

/// One compressor's frontier: `rows = coff·ratio` rows of `width = coff·d_c` floats.
#[derive(Debug, Clone)]
pub struct Frontier {
    pub ratio: usize,
    pub coff: usize,
    pub d_c: usize,
    pub kv: Vec<f32>,
    pub score: Vec<f32>,
}

impl Frontier {
    fn new(ratio: usize, coff: usize, d_c: usize) -> Self {
        let n = coff * ratio * coff * d_c;
        let mut f = Self {
            ratio,
            coff,
            d_c,
            kv: vec![0.0; n],
            score: vec![0.0; n],
        };
        f.reset();
        f
    }
    pub fn width(&self) -> usize {
        self.coff * self.d_c
    }
    pub fn reset(&mut self) {
        self.kv.fill(0.0);
        self.score.fill(f32::NEG_INFINITY);
    }
}

/// Compressed rows with a fixed capacity.
#[derive(Debug, Clone)]
pub struct RowCache {
    pub dim: usize,
    pub cap: usize,
    pub n: usize,
    pub data: Vec<f32>,
}

impl RowCache {
    fn new(dim: usize, cap: usize) -> Self {
        Self {
            dim,
            cap,
            n: 0,
            data: vec![0.0; dim * cap],
        }
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
    pub fn push(&mut self, row: &[f32]) -> Result<()> {
        if self.n >= self.cap {
            return Err(Error::ContextFull { ctx: self.cap });
        }
        self.data[self.n * self.dim..(self.n + 1) * self.dim].copy_from_slice(row);
        self.n += 1;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct LayerKv {
    pub kind: LayerKind,
    /// Raw ring: the row of position p lives at slot p % raw_cap.
    pub raw_cap: usize,
    pub raw: Vec<f32>,
    pub comp: Option<RowCache>,
    pub comp_state: Option<Frontier>,
    pub index: Option<RowCache>,
    pub index_state: Option<Frontier>,
}

#[derive(Debug, Clone)]
pub struct HostKv {
    pub ctx: usize,
    pub head_dim: usize,
    pub fingerprint: u64,
    pub layers: Vec<LayerKv>,
}

/// Compressed-row capacity for a context: every block that can close, plus slack.
fn comp_cap(ctx: usize, ratio: usize) -> usize {
    ctx / ratio + 1
}

impl HostKv {
    pub fn new(s: &ModelShape, ctx: usize) -> Self {
        let raw_cap = s.sliding_window.min(ctx.max(1));
        let layers = s
            .layer_kinds
            .iter()
            .map(|&kind| {
                let r = kind.ratio();
                let (comp, comp_state) = if kind.is_compressed() {
                    (
                        Some(RowCache::new(s.head_dim, comp_cap(ctx, r))),
                        Some(Frontier::new(r, kind.coff(), s.head_dim)),
                    )
                } else {
                    (None, None)
                };
                let (index, index_state) = if kind.is_csa() {
                    (
                        Some(RowCache::new(s.indexer_dim, comp_cap(ctx, r))),
                        Some(Frontier::new(r, 2, s.indexer_dim)),
                    )
                } else {
                    (None, None)
                };
                LayerKv {
                    kind,
                    raw_cap,
                    raw: vec![0.0; raw_cap * s.head_dim],
                    comp,
                    comp_state,
                    index,
                    index_state,
                }
            })
            .collect();
        Self {
            ctx,
            head_dim: s.head_dim,
            fingerprint: shape_fingerprint(s),
            layers,
        }
    }

    /// Bytes `new(s, ctx)` allocates, without allocating.
    pub fn estimate_bytes(s: &ModelShape, ctx: usize) -> usize {
        let raw_cap = s.sliding_window.min(ctx.max(1));
        let mut floats = 0usize;
        for &kind in &s.layer_kinds {
            floats += raw_cap * s.head_dim;
            let r = kind.ratio();
            if kind.is_compressed() {
                let c = kind.coff();
                floats += comp_cap(ctx, r) * s.head_dim + 2 * (c * r) * (c * s.head_dim);
            }
            if kind.is_csa() {
                floats += comp_cap(ctx, r) * s.indexer_dim + 2 * (2 * r) * (2 * s.indexer_dim);
            }
        }
        floats * 4
    }
}

/// FNV-1a over the shape's debug text: snapshots refuse to load into another model.
pub fn shape_fingerprint(s: &ModelShape) -> u64 {
    let text = format!("{s:?}");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const KV_MAGIC: &[u8; 4] = b"DS4K";
const KV_VERSION: u32 = 1;

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    out.reserve(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| Error::Snapshot("truncated KV snapshot".into()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn f32s(&mut self, dst: &mut [f32]) -> Result<()> {
        let s = self.take(dst.len() * 4)?;
        for (d, c) in dst.iter_mut().zip(s.chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}

impl KvStore for HostKv {
    fn memory_bytes(&self) -> usize {
        let mut floats = 0;
        for l in &self.layers {
            floats += l.raw.len();
            for c in [&l.comp, &l.index].into_iter().flatten() {
                floats += c.data.len();
            }
            for f in [&l.comp_state, &l.index_state].into_iter().flatten() {
                floats += f.kv.len() + f.score.len();
            }
        }
        floats * 4
    }

    fn reset(&mut self) {
        for l in &mut self.layers {
            l.raw.fill(0.0);
            for c in [&mut l.comp, &mut l.index].into_iter().flatten() {
                c.n = 0;
            }
            for f in [&mut l.comp_state, &mut l.index_state]
                .into_iter()
                .flatten()
            {
                f.reset();
            }
        }
    }

    fn save(&self, n_pos: usize, out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(KV_MAGIC);
        out.extend_from_slice(&KV_VERSION.to_le_bytes());
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        out.extend_from_slice(&(self.ctx as u64).to_le_bytes());
        out.extend_from_slice(&(n_pos as u64).to_le_bytes());
        for l in &self.layers {
            // Live raw rows in position order.
            let live = n_pos.min(l.raw_cap);
            for p in n_pos - live..n_pos {
                let slot = p % l.raw_cap;
                put_f32s(
                    out,
                    &l.raw[slot * self.head_dim..(slot + 1) * self.head_dim],
                );
            }
            for (c, f) in [(&l.comp, &l.comp_state), (&l.index, &l.index_state)] {
                if let (Some(c), Some(f)) = (c, f) {
                    out.extend_from_slice(&(c.n as u64).to_le_bytes());
                    put_f32s(out, &c.data[..c.n * c.dim]);
                    put_f32s(out, &f.kv);
                    put_f32s(out, &f.score);
                }
            }
        }
        Ok(())
    }

    fn load(&mut self, n_pos: usize, bytes: &[u8]) -> Result<usize> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(4)? != KV_MAGIC {
            return Err(Error::Snapshot("not a ds4 KV snapshot (bad magic)".into()));
        }
        let v = r.u32()?;
        if v != KV_VERSION {
            return Err(Error::Snapshot(format!(
                "KV snapshot version {v}, expected {KV_VERSION}"
            )));
        }
        if r.u64()? != self.fingerprint {
            return Err(Error::Snapshot(
                "KV snapshot was made with a different model".into(),
            ));
        }
        let ctx = r.u64()? as usize;
        if ctx != self.ctx {
            return Err(Error::Snapshot(format!(
                "KV snapshot context {ctx}, session context {}",
                self.ctx
            )));
        }
        let n = r.u64()? as usize;
        if n != n_pos || n > self.ctx {
            return Err(Error::Snapshot(format!(
                "KV snapshot holds {n} tokens, expected {n_pos}"
            )));
        }
        self.reset();
        let hd = self.head_dim;
        for l in &mut self.layers {
            let live = n.min(l.raw_cap);
            for p in n - live..n {
                let slot = p % l.raw_cap;
                r.f32s(&mut l.raw[slot * hd..(slot + 1) * hd])?;
            }
            for (c, f) in [
                (&mut l.comp, &mut l.comp_state),
                (&mut l.index, &mut l.index_state),
            ] {
                if let (Some(c), Some(f)) = (c, f) {
                    let rows = r.u64()? as usize;
                    if rows > c.cap {
                        return Err(Error::Snapshot(format!(
                            "{rows} compressed rows exceed capacity {}",
                            c.cap
                        )));
                    }
                    c.n = rows;
                    r.f32s(&mut c.data[..rows * c.dim])?;
                    r.f32s(&mut f.kv)?;
                    r.f32s(&mut f.score)?;
                }
            }
        }
        Ok(r.at)
    }
}
