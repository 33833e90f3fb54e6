//! The forward pass, written once over `Backend`: a chunk of tokens at contiguous
//! positions goes through every layer (layer-major), updating the KV state, and produces
//! logits for every position of the chunk. Decode is a chunk of one.

use crate::backend::{Backend, CompKind, CompUpdate, KvStore, QueryHeads, RopeKind};
use crate::shape::ModelShape;
use crate::weights::{LayerWeights, ModelWeights, TensorView};
use crate::{Error, Result};

/// Options that change numerics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardOptions {
    /// The official FP8 KV / Hadamard+FP4 indexer / f16 cache rounding (model.md §6).
    /// On by default; transformers does not do it.
    pub official_rounding: bool,
    /// Run the indexer even where every token of a chunk sees at most top_k
    /// compressed rows (it then picks them all; skipped by default, same result).
    /// For checks and timing.
    pub always_index: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            official_rounding: true,
            always_index: false,
        }
    }
}

/// A model bound to a backend: shape + backend weight handles.
pub struct Model<'w, B: Backend<'w>> {
    pub backend: B,
    pub shape: ModelShape,
    pub weights: ModelWeights<B::Weight>,
    pub options: ForwardOptions,
}

/// Which positions of a chunk get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// Every position (rows 0..n of `Buffers::logits`).
    All,
    /// The last position only (row 0).
    Last,
}

/// Per-session buffers: every activation the forward pass touches.
pub struct Buffers<A, I> {
    pub cap: usize,
    /// Unique per allocation: backends that record steps key the recordings on it.
    pub id: u64,
    state: A,
    y: A,
    post: A,
    comb: A,
    qr: A,
    q: A,
    kvr: A,
    comp_kv: A,
    comp_score: A,
    /// The indexer compressor's inputs (separate from the attention compressor's, so that
    /// every projection of the normed input can run as one `matmul_multi`).
    icomp_kv: A,
    icomp_score: A,
    iq: A,
    iw: A,
    attn: A,
    low: A,
    sub: A,
    head: A,
    /// The last token's HC state, when only its logits are wanted.
    last_state: A,
    pub logits: A,
    sel: I,
}

impl<'w, B: Backend<'w>> Model<'w, B> {
    /// Binds the shape's tensors from `src` and uploads them to the backend.
    pub fn new(
        backend: B,
        shape: ModelShape,
        src: &'w (impl crate::weights::TensorSource + ?Sized),
        options: ForwardOptions,
    ) -> Result<Self> {
        let views: ModelWeights<TensorView<'w>> = ModelWeights::bind(src, &shape)?;
        let weights = views.try_map(|t| backend.upload(t))?;
        Ok(Self {
            backend,
            shape,
            weights,
            options,
        })
    }

    /// Allocates activations for chunks of up to `cap` tokens.
    pub fn alloc_buffers(&self, cap: usize) -> Result<Buffers<B::Act, B::Idx>> {
        let s = &self.shape;
        let b = &self.backend;
        let cap = cap.max(1);
        let max_comp_w = 2 * s.head_dim;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Buffers {
            cap,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            state: b.alloc_act(cap, s.hc_dim())?,
            y: b.alloc_act(cap, s.n_embd)?,
            post: b.alloc_act(cap, s.hc_mult)?,
            comb: b.alloc_act(cap, s.hc_mult * s.hc_mult)?,
            qr: b.alloc_act(cap, s.q_lora_rank)?,
            q: b.alloc_act(cap, s.q_dim())?,
            kvr: b.alloc_act(cap, s.head_dim)?,
            comp_kv: b.alloc_act(cap, max_comp_w)?,
            comp_score: b.alloc_act(cap, max_comp_w)?,
            icomp_kv: b.alloc_act(cap, max_comp_w)?,
            icomp_score: b.alloc_act(cap, max_comp_w)?,
            iq: b.alloc_act(cap, s.indexer_heads * s.indexer_dim)?,
            iw: b.alloc_act(cap, s.indexer_heads)?,
            attn: b.alloc_act(cap, s.q_dim())?,
            low: b.alloc_act(cap, s.o_groups * s.o_lora_rank)?,
            sub: b.alloc_act(cap, s.n_embd)?,
            head: b.alloc_act(cap, s.n_embd)?,
            last_state: b.alloc_act(1, s.hc_dim())?,
            logits: b.alloc_act(cap, s.vocab)?,
            sel: b.alloc_idx(cap, s.indexer_top_k.max(1))?,
        })
    }

    pub fn alloc_kv(&self, ctx: usize) -> Result<B::Kv> {
        self.backend.alloc_kv(&self.shape, ctx)
    }

    /// Runs `tokens` (at positions pos0..) through the model, updating `kv`; logits of
    /// every position are left in `bufs.logits` (rows 0..tokens.len()).
    pub fn forward_chunk(
        &self,
        tokens: &[u32],
        pos0: usize,
        kv: &mut B::Kv,
        bufs: &mut Buffers<B::Act, B::Idx>,
    ) -> Result<()> {
        self.forward_chunk_with(tokens, pos0, kv, bufs, LogitRows::All)
    }

    /// `forward_chunk` computing the logits of every position or of the last only (row 0
    /// of `bufs.logits`): prefill that only samples after the chunk skips the output head
    /// for the other rows (for a 2K chunk, 1 GB of logits).
    pub fn forward_chunk_with(
        &self,
        tokens: &[u32],
        pos0: usize,
        kv: &mut B::Kv,
        bufs: &mut Buffers<B::Act, B::Idx>,
        rows: LogitRows,
    ) -> Result<()> {
        let n = tokens.len();
        if n == 0 {
            return Ok(());
        }
        if n > bufs.cap {
            return Err(Error::Config(format!(
                "chunk of {n} tokens exceeds buffer capacity {}",
                bufs.cap
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.shape.vocab) {
            return Err(Error::Token {
                token: t,
                vocab: self.shape.vocab,
            });
        }
        self.backend.begin_chunk(tokens, pos0)?;
        let id = bufs.id;
        // A recorded step is valid only for chunks that skip the same indexers.
        let variant = self.indexers_skipped(pos0, n) as u64;
        self.backend
            .run_chunk(n, id, variant, kv, &mut |kv: &mut B::Kv| {
                self.forward_layers(tokens, pos0, kv, bufs, rows)
            })
    }

    /// Whether a layer's indexer must score its compressed rows for the chunk at
    /// pos0..pos0 + n: not while every token of it sees at most top_k rows, since
    /// the top-k then picks all of them in order, which is what the attention reads
    /// without a selection (ds4 skips the indexer's q_b and weights there too). The
    /// indexer's own compressor still runs: later tokens need its rows.
    fn indexer_needed(&self, layer: &LayerWeights<B::Weight>, pos0: usize, n: usize) -> bool {
        let ratio = layer.kind.ratio();
        layer.attn.indexer.is_some()
            && ratio > 0
            && (self.options.always_index || (pos0 + n) / ratio > self.shape.indexer_top_k)
    }

    /// How many layers skip their indexer for the chunk at pos0..pos0 + n.
    pub fn indexers_skipped(&self, pos0: usize, n: usize) -> usize {
        self.weights
            .layers
            .iter()
            .filter(|l| l.attn.indexer.is_some() && !self.indexer_needed(l, pos0, n))
            .count()
    }

    /// Every operation of one chunk (see `forward_chunk`).
    fn forward_layers(
        &self,
        tokens: &[u32],
        pos0: usize,
        kv: &mut B::Kv,
        bufs: &mut Buffers<B::Act, B::Idx>,
        rows: LogitRows,
    ) -> Result<()> {
        let n = tokens.len();
        let s = &self.shape;
        let be = &self.backend;
        let official = self.options.official_rounding;
        let eps = s.rms_eps;
        be.embed(&self.weights.token_embd, tokens, s.hc_mult, &mut bufs.state)?;
        let layers = &self.weights.layers;
        // Each sublayer's HC merge is fused with the next sublayer's HC split; the first
        // split stands alone.
        if let Some(first) = layers.first() {
            be.hc_pre_norm(
                &first.hc_attn,
                &bufs.state,
                n,
                s,
                &first.attn.norm,
                &mut bufs.y,
                &mut bufs.post,
                &mut bufs.comb,
            )?;
        }
        for (il, lw) in layers.iter().enumerate() {
            let kind = lw.kind;
            let rope = if kind.is_compressed() {
                RopeKind::Compress
            } else {
                RopeKind::Plain
            };
            // ---- attention sublayer
            let a = &lw.attn;
            let index = self.indexer_needed(lw, pos0, n);
            // Every projection of the normed input y at once (one quantisation, few launches).
            be.matmul_multi(
                &[&a.q_a, &a.kv],
                &bufs.y,
                n,
                &mut [&mut bufs.qr, &mut bufs.kvr],
            )?;
            // The compressors (and the indexer's projections) only read y: a side branch
            // beside the query and KV-row chain, joined before the indexer and attention.
            let branched = a.compressor.is_some() || a.indexer.is_some();
            if branched {
                be.branch_begin(n)?;
                let mut ws: Vec<&B::Weight> = Vec::with_capacity(5);
                let mut outs: Vec<&mut B::Act> = Vec::with_capacity(5);
                if let Some(cw) = &a.compressor {
                    ws.extend([&cw.kv, &cw.gate]);
                    outs.extend([&mut bufs.comp_kv, &mut bufs.comp_score]);
                }
                if let Some(ix) = &a.indexer {
                    ws.extend([&ix.compressor.kv, &ix.compressor.gate]);
                    outs.extend([&mut bufs.icomp_kv, &mut bufs.icomp_score]);
                    if index {
                        ws.push(&ix.proj);
                        outs.push(&mut bufs.iw);
                    }
                }
                be.matmul_multi(&ws, &bufs.y, n, &mut outs)?;
                let mut updates = Vec::with_capacity(2);
                if let Some(cw) = &a.compressor {
                    updates.push(CompUpdate {
                        which: CompKind::Attn,
                        w: cw,
                        proj_kv: &bufs.comp_kv,
                        proj_score: &bufs.comp_score,
                    });
                }
                if let Some(ix) = &a.indexer {
                    updates.push(CompUpdate {
                        which: CompKind::Indexer,
                        w: &ix.compressor,
                        proj_kv: &bufs.icomp_kv,
                        proj_score: &bufs.icomp_score,
                    });
                }
                be.compressor_updates(kv, il, &updates, n, pos0, official)?;
                be.branch_end()?;
            }
            be.rms_norm(&mut bufs.qr, Some(&a.q_a_norm), n, s.q_lora_rank, eps)?;
            be.attn_queries(
                &a.q_b,
                a.indexer.as_ref().filter(|_| index).map(|ix| &ix.q_b),
                &bufs.qr,
                &a.kv_norm,
                n,
                QueryHeads {
                    head_dim: s.head_dim,
                    indexer_dim: s.indexer_dim,
                    eps,
                    rope,
                    pos0,
                    official,
                },
                &mut bufs.q,
                &mut bufs.iq,
                &mut bufs.kvr,
            )?;
            if branched || a.indexer.is_some() {
                be.branch_join()?;
            }
            let mut use_sel = false;
            if index {
                be.indexer_topk(
                    kv,
                    il,
                    &bufs.iq,
                    &bufs.iw,
                    n,
                    pos0,
                    s.indexer_top_k,
                    &mut bufs.sel,
                )?;
                use_sel = true;
            }
            let sel = if use_sel { Some(&bufs.sel) } else { None };
            // The raw-row append goes after both: the attention of a chunk reads the
            // ring slots it overwrites, the RoPE / o_a step neither.
            be.attention_rope_grouped(
                kv,
                il,
                &bufs.q,
                &bufs.kvr,
                &a.sinks,
                sel,
                n,
                pos0,
                &mut bufs.attn,
                s.head_dim,
                rope,
                &a.out_a,
                s.o_groups,
                &mut bufs.low,
            )?;
            be.kv_append_raw(kv, il, &bufs.kvr, n, pos0)?;
            be.matmul(&a.out_b, &bufs.low, n, &mut bufs.sub)?;
            // ---- FFN sublayer
            be.hc_post_pre_norm(
                &bufs.sub,
                n,
                s,
                &mut bufs.state,
                &lw.hc_ffn,
                &lw.ffn.norm,
                &mut bufs.y,
                &mut bufs.post,
                &mut bufs.comb,
            )?;
            match layers.get(il + 1) {
                Some(next) => be.moe_hc_post_pre_norm(
                    &lw.ffn,
                    il,
                    s,
                    tokens,
                    n,
                    &mut bufs.sub,
                    &mut bufs.state,
                    &next.hc_attn,
                    &next.attn.norm,
                    &mut bufs.y,
                    &mut bufs.post,
                    &mut bufs.comb,
                )?,
                None => {
                    be.moe(&lw.ffn, il, s, &bufs.y, tokens, n, &mut bufs.sub)?;
                    be.hc_post(
                        &bufs.sub,
                        &bufs.post,
                        &bufs.comb,
                        n,
                        s.hc_mult,
                        &mut bufs.state,
                    )?
                }
            }
        }
        let (state, m) = match rows {
            LogitRows::All => (&bufs.state, n),
            LogitRows::Last if n == 1 => (&bufs.state, 1),
            LogitRows::Last => {
                be.copy_row(&bufs.state, n - 1, &mut bufs.last_state, 0)?;
                (&bufs.last_state, 1)
            }
        };
        be.hc_head(&self.weights.hc_head, state, m, s, &mut bufs.head)?;
        be.rms_norm(
            &mut bufs.head,
            Some(&self.weights.output_norm),
            m,
            s.n_embd,
            eps,
        )?;
        be.matmul(&self.weights.output, &bufs.head, m, &mut bufs.logits)?;
        Ok(())
    }
}

/// A generation session: KV state, token history, buffers and the last logits.
pub struct Session<'m, 'w, B: Backend<'w>> {
    model: &'m Model<'w, B>,
    kv: B::Kv,
    bufs: Buffers<B::Act, B::Idx>,
    tokens: Vec<u32>,
    ctx: usize,
    /// The last position's logits (vocab wide), in backend host memory that the
    /// backend reads them straight into (page-locked on a GPU: no copy on the host).
    /// Only meaningful while `has_logits`.
    last_logits: B::HostBuf,
    /// Whether `last_logits` holds the logits of the last fed position (false before
    /// any token, after a rewind or a failed restore).
    has_logits: bool,
}

const SESSION_MAGIC: &[u8; 4] = b"DS4S";
const SESSION_VERSION: u32 = 1;

impl<'m, 'w, B: Backend<'w>> Session<'m, 'w, B> {
    /// A session for up to `ctx` tokens, prefilling in chunks of up to `max_chunk`.
    pub fn new(model: &'m Model<'w, B>, ctx: usize, max_chunk: usize) -> Result<Self> {
        let kv = model.alloc_kv(ctx)?;
        let bufs = model.alloc_buffers(max_chunk.min(ctx.max(1)))?;
        let last_logits = model.backend.alloc_host(model.shape.vocab)?;
        if last_logits.len() != model.shape.vocab {
            return Err(Error::Backend(format!(
                "alloc_host: {} values for a vocabulary of {}",
                last_logits.len(),
                model.shape.vocab
            )));
        }
        Ok(Self {
            model,
            kv,
            bufs,
            tokens: Vec::new(),
            ctx,
            last_logits,
            has_logits: false,
        })
    }

    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    pub fn ctx(&self) -> usize {
        self.ctx
    }
    pub fn kv_bytes(&self) -> usize {
        self.kv.memory_bytes()
    }
    /// Logits for the token after the last one fed (empty before any token).
    pub fn last_logits(&self) -> &[f32] {
        if self.has_logits {
            &self.last_logits
        } else {
            &[]
        }
    }

    /// Feeds `tokens`, chunk by chunk (`chunk` ≤ the buffer capacity). When `all_logits`
    /// is given, the logits of every fed position are appended to it.
    pub fn feed(
        &mut self,
        tokens: &[u32],
        chunk: usize,
        mut all_logits: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        if self.tokens.len() + tokens.len() > self.ctx {
            return Err(Error::ContextFull { ctx: self.ctx });
        }
        let vocab = self.model.shape.vocab;
        let chunk = chunk.clamp(1, self.bufs.cap);
        for piece in tokens.chunks(chunk) {
            let pos0 = self.tokens.len();
            let rows = if all_logits.is_some() {
                LogitRows::All
            } else {
                LogitRows::Last
            };
            self.model
                .forward_chunk_with(piece, pos0, &mut self.kv, &mut self.bufs, rows)?;
            let m = piece.len();
            if let Some(out) = all_logits.as_deref_mut() {
                let start = out.len();
                out.resize(start + m * vocab, 0.0);
                self.model
                    .backend
                    .read_rows(&self.bufs.logits, m, &mut out[start..])?;
                self.last_logits
                    .copy_from_slice(&out[start + (m - 1) * vocab..]);
                self.has_logits = true;
            } else {
                // Only the last position's logits were computed (row 0): read straight
                // into the session's host buffer. A failed read leaves none.
                self.has_logits = false;
                self.model
                    .backend
                    .read_rows_host(&self.bufs.logits, 1, &mut self.last_logits)?;
                self.has_logits = true;
            }
            self.tokens.extend_from_slice(piece);
        }
        Ok(())
    }

    /// Decodes one token; returns the logits for the next one.
    pub fn decode(&mut self, token: u32) -> Result<&[f32]> {
        self.feed(&[token], 1, None)?;
        Ok(self.last_logits())
    }

    /// Drops every token after position `n`. Exact: the state equals a fresh prefill of the
    /// first `n` tokens (it is recomputed from the kept tokens, since the sliding ring and
    /// compressor frontiers of earlier positions are already overwritten).
    pub fn rewind(&mut self, n: usize) -> Result<()> {
        if n > self.tokens.len() {
            return Err(Error::Config(format!(
                "cannot rewind to {n}: only {} tokens",
                self.tokens.len()
            )));
        }
        if n == self.tokens.len() {
            return Ok(());
        }
        let kept: Vec<u32> = self.tokens[..n].to_vec();
        self.kv.reset();
        self.tokens.clear();
        self.has_logits = false;
        let chunk = self.bufs.cap;
        self.feed(&kept, chunk, None)
    }

    /// Versioned snapshot: tokens, last logits and the KV state.
    pub fn snapshot(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(SESSION_MAGIC);
        out.extend_from_slice(&SESSION_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tokens.len() as u64).to_le_bytes());
        for t in &self.tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
        let logits = self.last_logits();
        out.extend_from_slice(&(logits.len() as u64).to_le_bytes());
        for v in logits {
            out.extend_from_slice(&v.to_le_bytes());
        }
        self.kv.save(self.tokens.len(), &mut out)?;
        Ok(out)
    }

    /// Restores a `snapshot`; a snapshot of another model or context is refused.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let err = |m: &str| Error::Snapshot(m.to_string());
        let get = |at: usize, n: usize| {
            bytes
                .get(at..at + n)
                .ok_or_else(|| err("truncated session snapshot"))
        };
        if get(0, 4)? != SESSION_MAGIC {
            return Err(err("not a ds4 session snapshot (bad magic)"));
        }
        let u32_at = |at: usize| -> Result<u32> {
            let s = get(at, 4)?;
            Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        };
        let u64_at = |at: usize| -> Result<u64> {
            let s = get(at, 8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            Ok(u64::from_le_bytes(a))
        };
        if u32_at(4)? != SESSION_VERSION {
            return Err(err("unsupported session snapshot version"));
        }
        let n = u64_at(8)? as usize;
        if n > self.ctx {
            return Err(Error::Snapshot(format!(
                "snapshot holds {n} tokens, session context is {}",
                self.ctx
            )));
        }
        let mut at = 16;
        let mut tokens = Vec::with_capacity(n);
        for _ in 0..n {
            tokens.push(u32_at(at)?);
            at += 4;
        }
        let nl = u64_at(at)? as usize;
        at += 8;
        if nl != 0 && nl != self.model.shape.vocab {
            return Err(err("snapshot logits do not match the vocabulary"));
        }
        let mut logits = Vec::with_capacity(nl);
        for _ in 0..nl {
            logits.push(f32::from_bits(u32_at(at)?));
            at += 4;
        }
        let kv_bytes = bytes
            .get(at..)
            .ok_or_else(|| err("truncated session snapshot"))?;
        match self.kv.load(n, kv_bytes) {
            Ok(_) => {}
            Err(e) => {
                // Leave a consistent (empty) session behind.
                self.kv.reset();
                self.tokens.clear();
                self.has_logits = false;
                return Err(e);
            }
        }
        self.tokens = tokens;
        // `nl` is 0 or the vocabulary (checked above), the buffer's length.
        self.has_logits = nl != 0;
        if self.has_logits {
            self.last_logits.copy_from_slice(&logits);
        }
        Ok(())
    }
}
