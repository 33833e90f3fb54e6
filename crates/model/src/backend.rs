//! The backend trait: fused operations at the granularity the forward pass needs.
//!
//! Design (so a GPU backend can keep everything resident and run a chunk layer-major
//! without host round trips):
//! * weights are mapped once to backend handles (`Backend::Weight`, via `upload`);
//! * activations are backend-owned matrices (`Backend::Act`, `rows × cols` f32) allocated
//!   once per session at the largest chunk; every op takes the number of live rows `n`
//!   (tokens of the chunk), so decode (n = 1) and prefill use the same code;
//! * the KV state is backend-owned (`Backend::Kv`) and only leaves the device for
//!   snapshots (`KvStore::save`);
//! * the only host reads are `read_rows` / `read_rows_host` (logits) — nothing inside a
//!   layer syncs. A session's last logits live in backend-provided host memory
//!   (`Backend::HostBuf`), so a GPU backend can copy them straight into page-locked
//!   memory that the session then hands out.
//!
//! Positions of a chunk are always contiguous: row i of every activation is the token at
//! absolute position `pos0 + i`.

use crate::Result;
use crate::shape::ModelShape;
use crate::weights::{CompressorWeights, FfnWeights, HcWeights, TensorView};

/// Which RoPE frequency set (model.md §6a).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeKind {
    /// θ = rope base, no scaling (sliding-window layers).
    Plain,
    /// θ = compress base with YaRN (compressed layers, compressors, indexer).
    Compress,
}

/// Which compressor of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompKind {
    /// Attention compressor (d_c = head_dim).
    Attn,
    /// Indexer compressor (d_c = indexer_dim), CSA only.
    Indexer,
}

/// Official precision simulations (model.md §6b–d) applied to rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowRounding {
    /// FP8-E4M3 round trip of the first `n_nope` dims of each `head_dim` row, then f16.
    KvRow,
    /// Hadamard-128 + FP4 round trip per 128-dim head.
    IndexerQat,
}

/// Settings of an attention layer's per-head query steps ([`Backend::attn_queries`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueryHeads {
    /// Width of an attention head (queries and the KV row).
    pub head_dim: usize,
    /// Width of an indexer query head.
    pub indexer_dim: usize,
    pub eps: f32,
    /// RoPE of the attention queries and the KV row (the indexer's is `Compress`).
    pub rope: RopeKind,
    pub pos0: usize,
    /// Official precision simulations (KV row rounding, indexer QAT).
    pub official: bool,
}

/// One compressor's step of [`Backend::compressor_updates`]: which compressor, its
/// weights and this chunk's projections.
pub struct CompUpdate<'a, W, A> {
    pub which: CompKind,
    pub w: &'a CompressorWeights<W>,
    pub proj_kv: &'a A,
    pub proj_score: &'a A,
}

/// The steps of [`Backend::attn_queries`] one by one, as its default runs them (a
/// backend that pairs them falls back to this where it cannot).
#[allow(clippy::too_many_arguments)]
pub fn attn_queries_separate<'w, B: Backend<'w> + ?Sized>(
    be: &B,
    q_b: &B::Weight,
    indexer_q_b: Option<&B::Weight>,
    qr: &B::Act,
    kv_norm: &B::Weight,
    n: usize,
    h: QueryHeads,
    q: &mut B::Act,
    iq: &mut B::Act,
    kv: &mut B::Act,
) -> Result<()> {
    // The indexer's query only reads the normed qr: a side branch takes it on, beside
    // q_b and the q / KV-row norms, until the join before the top-k.
    if let Some(ix_q_b) = indexer_q_b {
        be.branch_begin(n)?;
        be.matmul(ix_q_b, qr, n, iq)?;
        be.rope_indexer_q(iq, n, h.indexer_dim, RopeKind::Compress, h.pos0, h.official)?;
        be.branch_end()?;
    }
    be.matmul(q_b, qr, n, q)?;
    be.qkv_norm_rope(
        q, kv, kv_norm, n, h.head_dim, h.eps, h.rope, h.pos0, h.official,
    )
}

/// Session state that a backend owns (KV caches and compressor frontiers).
pub trait KvStore {
    /// Bytes allocated for this state.
    fn memory_bytes(&self) -> usize;
    /// Forget everything (position 0).
    fn reset(&mut self);
    /// Serialise the state valid after `n_pos` tokens.
    fn save(&self, n_pos: usize, out: &mut Vec<u8>) -> Result<()>;
    /// Restore from `save` output; returns the number of bytes consumed.
    fn load(&mut self, n_pos: usize, bytes: &[u8]) -> Result<usize>;
}

pub trait Backend<'w> {
    type Weight;
    type Act;
    /// Per-token selected compressed-row indices (indexer top-k).
    type Idx;
    type Kv: KvStore;
    /// Host memory of f32 that [`Self::read_rows_host`] writes into (a session's last
    /// logits): a plain `Vec<f32>` for a CPU backend, page-locked memory for a GPU one.
    /// Its length is fixed at allocation.
    type HostBuf: std::ops::Deref<Target = [f32]> + std::ops::DerefMut + Send;

    fn upload(&self, t: &TensorView<'w>) -> Result<Self::Weight>;
    fn alloc_act(&self, rows: usize, cols: usize) -> Result<Self::Act>;
    fn alloc_idx(&self, rows: usize, k: usize) -> Result<Self::Idx>;
    /// KV state sized for `ctx` tokens.
    fn alloc_kv(&self, shape: &ModelShape, ctx: usize) -> Result<Self::Kv>;

    /// out[i] = [e, e, …, e] (hc_mult copies of the embedding row of tokens[i]).
    fn embed(
        &self,
        table: &Self::Weight,
        tokens: &[u32],
        hc_mult: usize,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// out[i] = W · x[i] for i < n.
    fn matmul(&self, w: &Self::Weight, x: &Self::Act, n: usize, out: &mut Self::Act) -> Result<()>;
    /// Operations issued from here to [`Self::branch_end`] form a side branch: they may
    /// run beside the ones issued after `branch_end`, until [`Self::branch_join`]. The
    /// caller keeps the two sets independent (neither reads what the other writes).
    /// Running everything in issue order, as the defaults do, is always correct. A
    /// second `branch_begin` before the join continues the side branch: its operations
    /// follow the side's earlier ones and everything issued before it.
    fn branch_begin(&self, _n: usize) -> Result<()> {
        Ok(())
    }
    /// Ends the side branch begun by [`Self::branch_begin`].
    fn branch_end(&self) -> Result<()> {
        Ok(())
    }
    /// Operations issued after this wait for the side branch.
    fn branch_join(&self) -> Result<()> {
        Ok(())
    }
    /// outs[j] = ws[j] · x for every j: several weights applied to the same input, which a
    /// backend may quantize once and run as one launch.
    fn matmul_multi(
        &self,
        ws: &[&Self::Weight],
        x: &Self::Act,
        n: usize,
        outs: &mut [&mut Self::Act],
    ) -> Result<()> {
        if ws.len() != outs.len() {
            return Err(crate::Error::Backend(format!(
                "matmul_multi: {} weights, {} outputs",
                ws.len(),
                outs.len()
            )));
        }
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            self.matmul(w, x, n, out)?;
        }
        Ok(())
    }
    /// Grouped projection: output rows are split in `groups` equal parts; part g reads the
    /// g-th equal slice of x.
    fn matmul_grouped(
        &self,
        w: &Self::Weight,
        x: &Self::Act,
        n: usize,
        groups: usize,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// RMSNorm of each `seg`-wide piece of each row, in place; `w` (length seg) optional.
    fn rms_norm(
        &self,
        x: &mut Self::Act,
        w: Option<&Self::Weight>,
        n: usize,
        seg: usize,
        eps: f32,
    ) -> Result<()>;
    /// HC split (§7.1): y = Σ pre_s X[s]; post [n, N]; comb [n, N·N].
    #[allow(clippy::too_many_arguments)]
    fn hc_pre(
        &self,
        w: &HcWeights<Self::Weight>,
        state: &Self::Act,
        n: usize,
        shape: &ModelShape,
        y: &mut Self::Act,
        post: &mut Self::Act,
        comb: &mut Self::Act,
    ) -> Result<()>;
    /// RMSNorm of each `head_dim` head (optional weight), then RoPE on its last n_rot dims
    /// (row i at pos0 + i): one step where the backend can fuse them.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_rope(
        &self,
        x: &mut Self::Act,
        w: Option<&Self::Weight>,
        n: usize,
        head_dim: usize,
        eps: f32,
        kind: RopeKind,
        pos0: usize,
    ) -> Result<()> {
        self.rms_norm(x, w, n, head_dim, eps)?;
        self.rope(x, n, head_dim, kind, pos0, false)
    }
    /// The attention inputs' per-head steps: `rms_norm_rope` of the queries `q` (no
    /// weight) and of the KV rows `kv` (weight `kv_norm`), then, with `round_kv`, the KV
    /// rows' official rounding (`RowRounding::KvRow`): one step where a backend can run
    /// them as one launch.
    #[allow(clippy::too_many_arguments)]
    fn qkv_norm_rope(
        &self,
        q: &mut Self::Act,
        kv: &mut Self::Act,
        kv_norm: &Self::Weight,
        n: usize,
        head_dim: usize,
        eps: f32,
        kind: RopeKind,
        pos0: usize,
        round_kv: bool,
    ) -> Result<()> {
        self.rms_norm_rope(q, None, n, head_dim, eps, kind, pos0)?;
        self.rms_norm_rope(kv, Some(kv_norm), n, head_dim, eps, kind, pos0)?;
        if round_kv {
            self.round_rows(kv, n, RowRounding::KvRow)?;
        }
        Ok(())
    }
    /// `hc_pre`, then the RMSNorm of y with `norm` (n_embd wide): one step where the
    /// backend can fuse them.
    #[allow(clippy::too_many_arguments)]
    fn hc_pre_norm(
        &self,
        w: &HcWeights<Self::Weight>,
        state: &Self::Act,
        n: usize,
        shape: &ModelShape,
        norm: &Self::Weight,
        y: &mut Self::Act,
        post: &mut Self::Act,
        comb: &mut Self::Act,
    ) -> Result<()> {
        self.hc_pre(w, state, n, shape, y, post, comb)?;
        self.rms_norm(y, Some(norm), n, shape.n_embd, shape.rms_eps)
    }
    /// `hc_post` of a sublayer's output, then `hc_pre_norm` of the next sublayer (weights
    /// `next`, input norm `norm`) on the updated state: the merge and the next mixes read
    /// the same state, so a backend can do both in one pass over it.
    #[allow(clippy::too_many_arguments)]
    fn hc_post_pre_norm(
        &self,
        sub: &Self::Act,
        n: usize,
        shape: &ModelShape,
        state: &mut Self::Act,
        next: &HcWeights<Self::Weight>,
        norm: &Self::Weight,
        y: &mut Self::Act,
        post: &mut Self::Act,
        comb: &mut Self::Act,
    ) -> Result<()> {
        self.hc_post(sub, post, comb, n, shape.hc_mult, state)?;
        self.hc_pre_norm(next, state, n, shape, norm, y, post, comb)
    }
    /// HC merge (§7.2): X'[d] = post_d·o + Σ_a comb[a][d]·X[a], in place on `state`.
    fn hc_post(
        &self,
        sub: &Self::Act,
        post: &Self::Act,
        comb: &Self::Act,
        n: usize,
        hc_mult: usize,
        state: &mut Self::Act,
    ) -> Result<()>;
    /// Final HC collapse (§7.5 steps 1–3), before the output norm.
    fn hc_head(
        &self,
        w: &HcWeights<Self::Weight>,
        state: &Self::Act,
        n: usize,
        shape: &ModelShape,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// RoPE on the last n_rot dims of each `head_dim` head of each row (row i at pos0+i).
    fn rope(
        &self,
        x: &mut Self::Act,
        n: usize,
        head_dim: usize,
        kind: RopeKind,
        pos0: usize,
        inverse: bool,
    ) -> Result<()>;
    /// Inverse RoPE of the attention output (`rope` with `inverse`), then the grouped
    /// output projection `matmul_grouped(w, x, n, groups, out)`: one step where a backend
    /// can quantize the rotated rows as it writes them.
    #[allow(clippy::too_many_arguments)]
    fn rope_inverse_grouped(
        &self,
        x: &mut Self::Act,
        n: usize,
        head_dim: usize,
        kind: RopeKind,
        pos0: usize,
        w: &Self::Weight,
        groups: usize,
        out: &mut Self::Act,
    ) -> Result<()> {
        self.rope(x, n, head_dim, kind, pos0, true)?;
        self.matmul_grouped(w, x, n, groups, out)
    }
    fn round_rows(&self, x: &mut Self::Act, n: usize, mode: RowRounding) -> Result<()>;
    /// The indexer queries' RoPE (`rope`, forward), then `round_rows(IndexerQat)` when
    /// `official`: one step a backend can fuse.
    fn rope_indexer_q(
        &self,
        x: &mut Self::Act,
        n: usize,
        head_dim: usize,
        kind: RopeKind,
        pos0: usize,
        official: bool,
    ) -> Result<()> {
        self.rope(x, n, head_dim, kind, pos0, false)?;
        if official {
            self.round_rows(x, n, RowRounding::IndexerQat)?;
        }
        Ok(())
    }
    /// An attention layer's queries from the normed `qr`: q = q_b · qr, then
    /// `qkv_norm_rope(q, kv, ..)` (the KV row rounded when `official`); with an indexer
    /// (`indexer_q_b`), on a side branch, iq = indexer_q_b · qr, then
    /// `rope_indexer_q(iq, ..)`. One step where a backend can run the two products as
    /// one launch and the two per-head steps as another.
    #[allow(clippy::too_many_arguments)]
    fn attn_queries(
        &self,
        q_b: &Self::Weight,
        indexer_q_b: Option<&Self::Weight>,
        qr: &Self::Act,
        kv_norm: &Self::Weight,
        n: usize,
        h: QueryHeads,
        q: &mut Self::Act,
        iq: &mut Self::Act,
        kv: &mut Self::Act,
    ) -> Result<()> {
        attn_queries_separate(self, q_b, indexer_q_b, qr, kv_norm, n, h, q, iq, kv)
    }
    /// Compressor step for a chunk (§8): adds ape, writes the frontier, emits pooled rows
    /// (norm, RoPE, rounding when `official`) into the layer's compressed cache.
    #[allow(clippy::too_many_arguments)]
    fn compressor_update(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        which: CompKind,
        w: &CompressorWeights<Self::Weight>,
        proj_kv: &Self::Act,
        proj_score: &Self::Act,
        n: usize,
        pos0: usize,
        official: bool,
    ) -> Result<()>;
    /// The compressor steps of one layer (its attention compressor, then its indexer's),
    /// as `compressor_update` of each in turn; a backend may run them together.
    #[allow(clippy::too_many_arguments)]
    fn compressor_updates(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        updates: &[CompUpdate<'_, Self::Weight, Self::Act>],
        n: usize,
        pos0: usize,
        official: bool,
    ) -> Result<()> {
        for u in updates {
            self.compressor_update(
                kv,
                layer,
                u.which,
                u.w,
                u.proj_kv,
                u.proj_score,
                n,
                pos0,
                official,
            )?;
        }
        Ok(())
    }
    /// Lightning indexer (§9): per token, the top-k visible indexer rows by
    /// Σ_h w_h·relu(q_h·k). Rows past visibility are never chosen.
    #[allow(clippy::too_many_arguments)]
    fn indexer_topk(
        &self,
        kv: &Self::Kv,
        layer: usize,
        q: &Self::Act,
        weights: &Self::Act,
        n: usize,
        pos0: usize,
        top_k: usize,
        sel: &mut Self::Idx,
    ) -> Result<()>;
    /// Attention with sinks (§10) over the raw window (cache + this chunk's `rows`) and the
    /// visible compressed rows (selected ones when `sel` is given).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        kv: &Self::Kv,
        layer: usize,
        q: &Self::Act,
        rows: &Self::Act,
        sinks: &Self::Weight,
        sel: Option<&Self::Idx>,
        n: usize,
        pos0: usize,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// [`Self::attention`] into `attn`, then [`Self::rope_inverse_grouped`] of it
    /// (`w`, `groups` into `low`): one step where a backend can merge split attention
    /// partials as it rotates and quantizes them (decode).
    #[allow(clippy::too_many_arguments)]
    fn attention_rope_grouped(
        &self,
        kv: &Self::Kv,
        layer: usize,
        q: &Self::Act,
        rows: &Self::Act,
        sinks: &Self::Weight,
        sel: Option<&Self::Idx>,
        n: usize,
        pos0: usize,
        attn: &mut Self::Act,
        head_dim: usize,
        kind: RopeKind,
        w: &Self::Weight,
        groups: usize,
        low: &mut Self::Act,
    ) -> Result<()> {
        self.attention(kv, layer, q, rows, sinks, sel, n, pos0, attn)?;
        self.rope_inverse_grouped(attn, n, head_dim, kind, pos0, w, groups, low)
    }
    /// Appends this chunk's raw KV rows to the sliding window.
    fn kv_append_raw(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        rows: &Self::Act,
        n: usize,
        pos0: usize,
    ) -> Result<()>;
    /// Router + routed experts + shared expert (§7.4 steps 3–8, without HC).
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        w: &FfnWeights<Self::Weight>,
        layer: usize,
        shape: &ModelShape,
        x: &Self::Act,
        tokens: &[u32],
        n: usize,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// The FFN sublayer's end: `moe` of the normed input `y` into `sub`, then
    /// `hc_post_pre_norm` of `sub` with the next sublayer's HC weights and input norm
    /// (y receives the next input). A backend may sum the experts' outputs inside the
    /// merge instead of writing `sub` (its contents are then unspecified).
    #[allow(clippy::too_many_arguments)]
    fn moe_hc_post_pre_norm(
        &self,
        w: &FfnWeights<Self::Weight>,
        layer: usize,
        shape: &ModelShape,
        tokens: &[u32],
        n: usize,
        sub: &mut Self::Act,
        state: &mut Self::Act,
        next: &HcWeights<Self::Weight>,
        norm: &Self::Weight,
        y: &mut Self::Act,
        post: &mut Self::Act,
        comb: &mut Self::Act,
    ) -> Result<()> {
        self.moe(w, layer, shape, y, tokens, n, sub)?;
        self.hc_post_pre_norm(sub, n, shape, state, next, norm, y, post, comb)
    }
    /// Copies the first n rows to the host (row-major).
    fn read_rows(&self, x: &Self::Act, n: usize, out: &mut [f32]) -> Result<()>;
    /// Host memory for `len` f32 values, all zero.
    fn alloc_host(&self, len: usize) -> Result<Self::HostBuf>;
    /// [`Self::read_rows`] into backend host memory (from [`Self::alloc_host`]): the
    /// first `n · cols` values of `out` receive the rows, the rest is left as it was.
    fn read_rows_host(&self, x: &Self::Act, n: usize, out: &mut Self::HostBuf) -> Result<()> {
        self.read_rows(x, n, out)
    }
    /// dst[dst_row] = src[src_row] (same width).
    fn copy_row(
        &self,
        src: &Self::Act,
        src_row: usize,
        dst: &mut Self::Act,
        dst_row: usize,
    ) -> Result<()>;

    /// Called before the layers of every chunk. A GPU backend uploads the chunk's token
    /// ids and first position here, so that the launches of a step do not depend on them
    /// and can be recorded once and replayed.
    fn begin_chunk(&self, _tokens: &[u32], _pos0: usize) -> Result<()> {
        Ok(())
    }

    /// Runs `body` (every operation of one chunk of `n` tokens on `kv` and the buffers
    /// identified by `bufs_id`; `variant` tells apart chunks whose operations differ,
    /// such as the indexers skipped at short contexts). The default runs it; a GPU
    /// backend may record a decode step once and replay the recording for later steps
    /// with the same key.
    fn run_chunk(
        &self,
        _n: usize,
        _bufs_id: u64,
        _variant: u64,
        kv: &mut Self::Kv,
        body: &mut dyn FnMut(&mut Self::Kv) -> Result<()>,
    ) -> Result<()> {
        body(kv)
    }
}
