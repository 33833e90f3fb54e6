//! GPU memory planner: given the model shape, the weight tensors as they will be
//! uploaded, the context and prefill chunk, and the card's free memory, it says what goes
//! where and whether it fits — before anything is allocated. Pure host arithmetic.
//!
//! Every class lives on the GPU today; [`Placement::Host`] exists so routed experts can
//! later be offloaded to (pinned) host memory without changing the report.

use std::fmt;

use ds4_gguf::{GgmlType, GgufFile};
use ds4_model::config::Config;
use ds4_model::kv::HostKv;
use ds4_model::layout::{TensorClass, expected_tensors};
use ds4_model::shape::ModelShape;
use ds4_model::synthetic::{ExpertTypes, flash_prefix};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Memory the CUDA context, cuBLAS workspace, loaded kernel modules and captured graphs
/// take beyond our own buffers. A Hopper context alone is ~500 MiB; cuBLAS asks 32 MiB of
/// workspace per handle on sm_90; modules and graphs add tens of MiB. Rounded up.
pub const CUDA_RESERVE_BYTES: u64 = 768 * MIB;

/// Share of the card's total memory kept free (allocator fragmentation and rounding,
/// other processes' small allocations).
pub const SAFETY_MARGIN_PERCENT: u64 = 2;

/// Largest context the planner searches: Flash's trained context (model.md §2).
pub const MAX_CONTEXT: usize = 1 << 20;

/// f32 activations.
const ACT_BYTES: u64 = 4;

/// Where a class of memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Gpu,
    /// Host RAM (not used yet: expert offload).
    Host,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Gpu => "gpu",
            Placement::Host => "host",
        }
    }
}

/// One line of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemClass {
    /// Routed expert gate/up/down (`*_exps`).
    RoutedExperts,
    /// Attention q/kv/o projections, sinks, compressors and the indexer.
    Attention,
    /// Shared expert (`*_shexp`).
    SharedExperts,
    /// Router (gate_inp, bias, tid2eid), hyper-connection mixers and every norm.
    RouterHcNorms,
    TokenEmbedding,
    OutputHead,
    /// Tensors the planner does not recognise (extra tensors in a file).
    OtherWeights,
    /// KV state at the planned context (raw windows, compressed and indexer rows).
    KvState,
    /// Per-token activation buffers for one chunk plus their quantized copies.
    Activations,
    /// Routed-MoE / GEMM intermediates for one chunk.
    MoeScratch,
    /// Prefill indexer scores and masks against every compressed row.
    IndexerScratch,
    /// Decode attention split partials (`attention::scratch_bytes`) at the planned context.
    AttentionScratch,
    /// [`CUDA_RESERVE_BYTES`].
    CudaReserve,
    /// [`SAFETY_MARGIN_PERCENT`] of total memory.
    SafetyMargin,
}

impl MemClass {
    pub const ALL: [MemClass; 14] = [
        MemClass::RoutedExperts,
        MemClass::Attention,
        MemClass::SharedExperts,
        MemClass::RouterHcNorms,
        MemClass::TokenEmbedding,
        MemClass::OutputHead,
        MemClass::OtherWeights,
        MemClass::KvState,
        MemClass::Activations,
        MemClass::MoeScratch,
        MemClass::IndexerScratch,
        MemClass::AttentionScratch,
        MemClass::CudaReserve,
        MemClass::SafetyMargin,
    ];

    pub fn label(self) -> &'static str {
        match self {
            MemClass::RoutedExperts => "routed experts",
            MemClass::Attention => "attention (q/kv/o/compressor/indexer)",
            MemClass::SharedExperts => "shared expert",
            MemClass::RouterHcNorms => "router + HC + norms",
            MemClass::TokenEmbedding => "token embedding",
            MemClass::OutputHead => "output head",
            MemClass::OtherWeights => "other tensors",
            MemClass::KvState => "KV state",
            MemClass::Activations => "activations (chunk)",
            MemClass::MoeScratch => "MoE/GEMM scratch (chunk)",
            MemClass::IndexerScratch => "indexer prefill scores",
            MemClass::AttentionScratch => "attention decode partials",
            MemClass::CudaReserve => "CUDA context/cuBLAS/kernels",
            MemClass::SafetyMargin => "safety margin",
        }
    }

    pub fn is_weight(self) -> bool {
        matches!(
            self,
            MemClass::RoutedExperts
                | MemClass::Attention
                | MemClass::SharedExperts
                | MemClass::RouterHcNorms
                | MemClass::TokenEmbedding
                | MemClass::OutputHead
                | MemClass::OtherWeights
        )
    }

    /// The class a weight tensor belongs to, by its GGUF name.
    pub fn of_tensor(name: &str) -> MemClass {
        let leaf = name.rsplit_once("blk.").map_or(name, |(_, rest)| {
            rest.split_once('.').map_or(rest, |(_, leaf)| leaf)
        });
        match name {
            "token_embd.weight" => return MemClass::TokenEmbedding,
            "output.weight" => return MemClass::OutputHead,
            _ => {}
        }
        if leaf.contains("_exps.") {
            MemClass::RoutedExperts
        } else if leaf.contains("_shexp.") {
            MemClass::SharedExperts
        } else if leaf.ends_with("norm.weight")
            || leaf.contains("hc_")
            || leaf.starts_with("ffn_gate_inp")
            || leaf.starts_with("exp_probs_b")
            || leaf.contains("tid2eid")
        {
            MemClass::RouterHcNorms
        } else if name.starts_with("blk.")
            && (leaf.starts_with("attn_") || leaf.starts_with("indexer"))
        {
            MemClass::Attention
        } else {
            MemClass::OtherWeights
        }
    }
}

/// One weight tensor as it will be uploaded: name, type, bytes.
pub type TensorEntry = (String, GgmlType, u64);

/// Every tensor `cfg` implies with the type the published files use (routed experts from
/// `experts`), sized from its dims. Optional tensors (`exp_probs_b.bias`) are included:
/// the published files carry them.
pub fn tensor_list(cfg: &Config, experts: ExpertTypes) -> Vec<TensorEntry> {
    expected_tensors(cfg)
        .into_iter()
        .map(|t| {
            let ty = match t.class {
                TensorClass::RoutedGateUp => experts.gate_up(),
                TensorClass::RoutedDown => experts.down(),
                TensorClass::F16 => GgmlType::F16,
                TensorClass::F32 => GgmlType::F32,
                TensorClass::Q8 => GgmlType::Q8_0,
                TensorClass::TokenToExpert => GgmlType::I32,
            };
            let (ne0, rows) = match t.dims.split_first() {
                Some((&ne0, rest)) => (ne0, rest.iter().product::<u64>()),
                None => (0, 0),
            };
            // Config dims are block-aligned for the published types (checked by
            // layout validation); an unaligned row would be an unloadable tensor.
            let bytes = ty.row_bytes(ne0).unwrap_or(0).saturating_mul(rows);
            (t.name, ty, bytes)
        })
        .collect()
}

/// The real DeepSeek V4 Flash tensor list (first `layers` layers of the 43, schedule and
/// hash layers included) for the q2 or q4 file.
pub fn flash_tensor_list(experts: ExpertTypes, layers: usize) -> Vec<TensorEntry> {
    tensor_list(&flash_prefix(layers), experts)
}

/// The tensors of a GGUF file, as uploaded.
pub fn gguf_tensor_list(file: &GgufFile) -> Vec<TensorEntry> {
    file.tensors()
        .iter()
        .map(|t| (t.name.clone(), t.ggml_type, t.n_bytes))
        .collect()
}

/// Device memory to plan against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free: u64,
    pub total: u64,
}

impl DeviceMemory {
    /// `free` GiB free of `total` GiB (fractions allowed).
    pub fn gib(free: f64, total: f64) -> Self {
        let b = |g: f64| (g.max(0.0) * GIB as f64) as u64;
        Self {
            free: b(free),
            total: b(total.max(free)),
        }
    }
}

/// One class, where it goes and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanItem {
    pub class: MemClass,
    pub placement: Placement,
    pub bytes: u64,
}

/// What goes where for one (model, ctx, chunk, device).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    shape: ModelShape,
    /// Weight bytes per weight class (context-independent).
    weights: Vec<(MemClass, u64)>,
    pub ctx: usize,
    pub chunk: usize,
    pub device: DeviceMemory,
    pub items: Vec<PlanItem>,
}

/// Why a plan is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("{}", does_not_fit_text(*.ctx, *.need, *.free, *.weights, *.max_ctx))]
    DoesNotFit {
        ctx: usize,
        need: u64,
        free: u64,
        weights: u64,
        /// Largest context that fits with everything else unchanged, if any.
        max_ctx: Option<usize>,
    },
}

fn does_not_fit_text(
    ctx: usize,
    need: u64,
    free: u64,
    weights: u64,
    max_ctx: Option<usize>,
) -> String {
    let head = format!(
        "the model at ctx {ctx} does not fit: needs {}, {} free; weights alone {}",
        gib1(need),
        gib1(free),
        gib1(weights)
    );
    match max_ctx {
        Some(c) => format!(
            "{head} — the largest context that fits is {c} tokens (--ctx {c}), or use a \
             smaller quant / offload experts (not yet implemented)"
        ),
        None => format!(
            "{head} — no context fits; use a smaller quant / offload experts (not yet \
             implemented)"
        ),
    }
}

/// `97.3 GiB`.
fn gib1(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB as f64)
}

/// `71.47 GiB` or `12.3 MiB`, right-aligned by the caller.
fn human(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.2} GiB", bytes as f64 / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / KIB as f64)
    }
}

fn u(x: usize) -> u64 {
    x as u64
}

/// f32 activation columns per token row, as `Model::alloc_buffers` allocates them
/// (state, y, post, comb, qr, q, kvr, comp_kv, comp_score, icomp_kv, icomp_score, iq, iw,
/// attn, low, sub, head, logits, and the u32 top-k selection).
fn activation_columns(s: &ModelShape) -> u64 {
    let max_comp_w = 2 * s.head_dim;
    u(s.hc_dim()
        + s.n_embd
        + s.hc_mult
        + s.hc_mult * s.hc_mult
        + s.q_lora_rank
        + s.q_dim()
        + s.head_dim
        + 4 * max_comp_w
        + s.indexer_heads * s.indexer_dim
        + s.indexer_heads
        + s.q_dim()
        + s.o_groups * s.o_lora_rank
        + 2 * s.n_embd
        + s.vocab
        + s.indexer_top_k.max(1))
}

/// Distinct matvec input widths: the backend keeps one quantized activation copy per
/// width (its scratch is keyed by width).
fn input_widths(s: &ModelShape) -> Vec<u64> {
    let mut w = vec![
        u(s.hc_dim()),
        u(s.n_embd),
        u(s.q_lora_rank),
        u(s.q_dim()),
        u(s.n_ff_exp),
    ];
    w.sort_unstable();
    w.dedup();
    w
}

/// Widest matvec input.
fn max_input_width(s: &ModelShape) -> u64 {
    input_widths(s).into_iter().max().unwrap_or(0)
}

/// f32 scratch columns per token that the CUDA backend grows on demand (backend.rs):
/// router logits, chosen ids and weights, gate/up/mid and down of every chosen expert,
/// the shared expert's gate/up/mid/out, the MoE input, the grouped-projection staging
/// (in and out), the strided-input copy and the HC mixes.
fn moe_gemm_columns(s: &ModelShape) -> u64 {
    let (k, ff, e) = (s.n_expert_used, s.n_ff_exp, s.n_embd);
    u(s.n_expert
        + 2 * k
        + 3 * k * ff
        + k * e
        + 3 * ff
        + 2 * e
        + s.q_dim()
        + s.o_groups * s.o_lora_rank
        + s.hc_mix())
        + max_input_width(s)
}

/// Tokens whose indexer scores are materialised at once (`IDX_TOKENS_PER_PASS` of the
/// CUDA backend): the score scratch is this many rows of every compressed row.
pub const INDEXER_TOKENS_PER_PASS: usize = 64;

/// Smallest CSA ratio (most compressed rows), if the model has CSA layers.
fn min_csa_ratio(s: &ModelShape) -> Option<usize> {
    s.layer_kinds
        .iter()
        .filter(|k| k.is_csa())
        .map(|k| k.ratio())
        .filter(|&r| r > 0)
        .min()
}

impl MemoryPlan {
    /// Plans `tensors` (as uploaded) plus the state for `ctx` tokens and prefill chunks of
    /// `chunk` tokens. `ctx` and `chunk` below 1 are taken as 1; a chunk larger than the
    /// context is clamped to it (a session never feeds more).
    pub fn new(
        shape: &ModelShape,
        tensors: &[TensorEntry],
        ctx: usize,
        chunk: usize,
        device: DeviceMemory,
    ) -> MemoryPlan {
        let mut weights: Vec<(MemClass, u64)> = MemClass::ALL
            .iter()
            .filter(|c| c.is_weight())
            .map(|&c| (c, 0))
            .collect();
        for (name, _, bytes) in tensors {
            let class = MemClass::of_tensor(name);
            if let Some(slot) = weights.iter_mut().find(|(c, _)| *c == class) {
                slot.1 = slot.1.saturating_add(*bytes);
            }
        }
        Self::with_weights(shape.clone(), weights, ctx, chunk, device)
    }

    fn with_weights(
        shape: ModelShape,
        weights: Vec<(MemClass, u64)>,
        ctx: usize,
        chunk: usize,
        device: DeviceMemory,
    ) -> MemoryPlan {
        let ctx = ctx.max(1);
        let chunk = chunk.max(1);
        let s = &shape;
        let rows = u(chunk.min(ctx));
        let kv = u(HostKv::estimate_bytes(s, ctx));
        let k: u64 = input_widths(s).iter().sum();
        // f32 columns, then the int8 copies with their block scales (~1 + 4/32 + 2/16 B/elem).
        let activations =
            rows * activation_columns(s) * ACT_BYTES + rows * k + rows * k / 8 + rows * k / 8;
        let moe = rows * moe_gemm_columns(s) * ACT_BYTES;
        // f32 scores of up to INDEXER_TOKENS_PER_PASS chunk tokens against every
        // compressed row of a CSA layer (capacity ctx/r + 1, as the KV rows).
        let score_rows = rows.min(u(INDEXER_TOKENS_PER_PASS));
        let indexer = min_csa_ratio(s).map_or(0, |r| (u(ctx / r) + 1) * score_rows * ACT_BYTES);
        // Decode attention keeps per-split partials for up to SPLIT_MAX_TOKENS tokens; the
        // layer with the most keys (window + picks, or every compressed row) sets the size.
        let split_tokens = chunk.min(ctx).min(crate::attention::SPLIT_MAX_TOKENS);
        let attention = s
            .layer_kinds
            .iter()
            .map(|k| {
                let ratio = k.ratio();
                let comp_cap = ctx.checked_div(ratio).map_or(0, |c| c + 1);
                let sel = k.is_csa().then_some(s.indexer_top_k);
                let keys = crate::attention::max_keys(s.sliding_window, ratio, comp_cap, sel);
                u(crate::attention::scratch_bytes(
                    s.n_head,
                    s.head_dim,
                    split_tokens,
                    keys,
                ))
            })
            .max()
            .unwrap_or(0);
        let margin = device.total / 100 * SAFETY_MARGIN_PERCENT;
        let gpu = |class, bytes| PlanItem {
            class,
            placement: Placement::Gpu,
            bytes,
        };
        let mut items: Vec<PlanItem> = weights.iter().map(|&(c, b)| gpu(c, b)).collect();
        items.extend([
            gpu(MemClass::KvState, kv),
            gpu(MemClass::Activations, activations),
            gpu(MemClass::MoeScratch, moe),
            gpu(MemClass::IndexerScratch, indexer),
            gpu(MemClass::AttentionScratch, attention),
            gpu(MemClass::CudaReserve, CUDA_RESERVE_BYTES),
            gpu(MemClass::SafetyMargin, margin),
        ]);
        MemoryPlan {
            shape,
            weights,
            ctx,
            chunk,
            device,
            items,
        }
    }

    /// Bytes of `class` (0 when absent).
    pub fn bytes(&self, class: MemClass) -> u64 {
        self.items
            .iter()
            .filter(|i| i.class == class)
            .map(|i| i.bytes)
            .sum()
    }

    fn sum_where(&self, pred: impl Fn(&PlanItem) -> bool) -> u64 {
        self.items
            .iter()
            .filter(|i| pred(i))
            .fold(0u64, |a, i| a.saturating_add(i.bytes))
    }

    /// GPU bytes needed, reserve and margin included.
    pub fn need_bytes(&self) -> u64 {
        self.sum_where(|i| i.placement == Placement::Gpu)
    }

    /// Host bytes needed (0 until expert offload exists).
    pub fn host_bytes(&self) -> u64 {
        self.sum_where(|i| i.placement == Placement::Host)
    }

    /// Weight bytes wherever they live.
    pub fn weight_bytes(&self) -> u64 {
        self.sum_where(|i| i.class.is_weight())
    }

    pub fn fits(&self) -> bool {
        self.need_bytes() <= self.device.free
    }

    /// The same plan at another context.
    pub fn at_ctx(&self, ctx: usize) -> MemoryPlan {
        Self::with_weights(
            self.shape.clone(),
            self.weights.clone(),
            ctx,
            self.chunk,
            self.device,
        )
    }

    /// Largest context up to [`MAX_CONTEXT`] that fits with everything else fixed; `None`
    /// when not even one token does. Every term grows with ctx, so a binary search holds.
    pub fn max_ctx_that_fits(&self) -> Option<usize> {
        if !self.at_ctx(1).fits() {
            return None;
        }
        let (mut lo, mut hi) = (1usize, MAX_CONTEXT);
        if self.at_ctx(hi).fits() {
            return Some(hi);
        }
        // Invariant: lo fits, hi does not.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.at_ctx(mid).fits() {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    }

    /// `Ok` when the plan fits, else the numbers and what to do.
    pub fn check(&self) -> Result<(), PlanError> {
        if self.fits() {
            return Ok(());
        }
        Err(PlanError::DoesNotFit {
            ctx: self.ctx,
            need: self.need_bytes(),
            free: self.device.free,
            weights: self.weight_bytes(),
            max_ctx: self.max_ctx_that_fits(),
        })
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let need = self.need_bytes();
        let share = |b: u64| {
            if need == 0 {
                0.0
            } else {
                100.0 * b as f64 / need as f64
            }
        };
        writeln!(
            f,
            "memory plan: ctx {} tokens, prefill chunk {} tokens",
            self.ctx, self.chunk
        )?;
        writeln!(
            f,
            "  {:<38} {:<5} {:>11} {:>6}",
            "class", "where", "size", "share"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, label: &str, place: &str, b: u64| {
            writeln!(
                f,
                "  {label:<38} {place:<5} {:>11} {:>5.1}%",
                human(b),
                share(b)
            )
        };
        for item in &self.items {
            if item.bytes == 0 && item.class == MemClass::OtherWeights {
                continue;
            }
            row(f, item.class.label(), item.placement.name(), item.bytes)?;
        }
        writeln!(f, "  {}", "-".repeat(64))?;
        row(f, "weights", "", self.weight_bytes())?;
        let state = need.saturating_sub(self.weight_bytes());
        row(f, "state, buffers, reserve and margin", "", state)?;
        let verdict = if self.fits() { "fits" } else { "does NOT fit" };
        write!(
            f,
            "need {} of {} free ({} total): {verdict}",
            gib1(need),
            gib1(self.device.free),
            gib1(self.device.total)
        )?;
        if self.host_bytes() > 0 {
            write!(f, "; host {}", gib1(self.host_bytes()))?;
        }
        writeln!(f)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn flash_q2(ctx: usize, free_gib: f64, total_gib: f64) -> MemoryPlan {
        let cfg = Config::flash();
        MemoryPlan::new(
            &cfg.shape(),
            &flash_tensor_list(ExpertTypes::Q2, 43),
            ctx,
            2048,
            DeviceMemory::gib(free_gib, total_gib),
        )
    }

    fn gib(b: u64) -> f64 {
        b as f64 / GIB as f64
    }

    #[test]
    fn flash_q2_weights_match_the_published_file() {
        let list = flash_tensor_list(ExpertTypes::Q2, 43);
        let total: u64 = list.iter().map(|t| t.2).sum();
        // model.md §0: the q2 file is 80.8 GiB (the header and metadata are a few MiB).
        assert!((gib(total) - 80.8).abs() < 0.1, "{}", gib(total));
        let q4: u64 = flash_tensor_list(ExpertTypes::Q4, 43)
            .iter()
            .map(|t| t.2)
            .sum();
        assert!((gib(q4) - 153.3).abs() < 0.1, "{}", gib(q4));
        // One routed layer: 256 experts × 2048 × 4096 per matrix; IQ2_XXS is 66 B / 256,
        // Q2_K 84 B / 256.
        let per_mat = 256 * 2048 * 4096 / 256;
        let layer0: u64 = list
            .iter()
            .filter(|t| t.0.starts_with("blk.0.") && t.0.contains("_exps"))
            .map(|t| t.2)
            .sum();
        assert_eq!(layer0, per_mat * (66 + 66 + 84));
    }

    #[test]
    fn tensor_classes() {
        let c = MemClass::of_tensor;
        assert_eq!(c("blk.3.ffn_gate_exps.weight"), MemClass::RoutedExperts);
        assert_eq!(c("blk.3.ffn_down_shexp.weight"), MemClass::SharedExperts);
        assert_eq!(c("blk.3.attn_q_b.weight"), MemClass::Attention);
        assert_eq!(c("blk.3.attn_compressor_kv.weight"), MemClass::Attention);
        assert_eq!(c("blk.3.indexer.proj.weight"), MemClass::Attention);
        assert_eq!(c("blk.3.attn_sinks.weight"), MemClass::Attention);
        assert_eq!(c("blk.3.attn_q_a_norm.weight"), MemClass::RouterHcNorms);
        assert_eq!(
            c("blk.3.indexer_compressor_norm.weight"),
            MemClass::RouterHcNorms
        );
        assert_eq!(c("blk.3.hc_attn_fn.weight"), MemClass::RouterHcNorms);
        assert_eq!(c("blk.0.ffn_gate_tid2eid.weight"), MemClass::RouterHcNorms);
        assert_eq!(c("blk.3.ffn_gate_inp.weight"), MemClass::RouterHcNorms);
        assert_eq!(c("blk.3.exp_probs_b.bias"), MemClass::RouterHcNorms);
        assert_eq!(c("output_hc_fn.weight"), MemClass::RouterHcNorms);
        assert_eq!(c("output_norm.weight"), MemClass::RouterHcNorms);
        assert_eq!(c("token_embd.weight"), MemClass::TokenEmbedding);
        assert_eq!(c("output.weight"), MemClass::OutputHead);
        assert_eq!(c("rope_freqs.weight"), MemClass::OtherWeights);
        // Every Flash tensor is recognised.
        for (name, _, _) in flash_tensor_list(ExpertTypes::Q4, 43) {
            assert_ne!(c(&name), MemClass::OtherWeights, "{name}");
        }
    }

    /// The full q2 model does not fit an 80 GB H100 (79.1 GiB usable, ~78.1 free): the
    /// weights alone (80.8 GiB) exceed the card, so no context fits.
    #[test]
    fn flash_q2_does_not_fit_an_80gb_card() {
        let plan = flash_q2(32768, 78.1, 79.1);
        let w = gib(plan.weight_bytes());
        assert!(w > 78.1, "weights {w}");
        assert!(!plan.fits());
        assert_eq!(plan.max_ctx_that_fits(), None);
        let need = gib(plan.need_bytes());
        // Weights + KV (~0.43 GiB at 32K) + chunk buffers + 0.75 GiB reserve + 1.6 GiB margin.
        assert!(need > w + 2.5 && need < w + 6.0, "need {need}, weights {w}");
        let err = plan.check().unwrap_err().to_string();
        assert!(err.contains("no context fits"), "{err}");
        // 1M: the 14.4 GB of compressed KV make it worse still.
        let big = flash_q2(MAX_CONTEXT, 78.1, 79.1);
        let kv = gib(big.bytes(MemClass::KvState));
        assert!((kv - 13.6).abs() < 0.3, "kv {kv}");
        assert!(!big.fits());
    }

    /// On a 141 GB H200 (139 GiB free) q2 fits at 32K and at 1M.
    #[test]
    fn flash_q2_fits_an_h200() {
        let plan = flash_q2(32768, 139.0, 139.8);
        assert!(plan.fits(), "{plan}");
        plan.check().unwrap();
        let big = flash_q2(MAX_CONTEXT, 139.0, 139.8);
        assert!(big.fits(), "{big}");
        assert_eq!(big.max_ctx_that_fits(), Some(MAX_CONTEXT));
        // KV at 2^20: 13,760 B/token asymptotically (model.md §12) plus fixed windows.
        let kv = big.bytes(MemClass::KvState) as f64;
        let per_token = (kv - plan.bytes(MemClass::KvState) as f64) / (MAX_CONTEXT - 32768) as f64;
        assert!((per_token - 13760.0).abs() < 20.0, "{per_token}");
    }

    /// Decode attention partials: 8 tokens x the splits of the layer with the most keys
    /// (ratio 4 at 32K: 128 raw + 512 picks; ratio 128 at 1M: 128 + 8193 rows).
    #[test]
    fn attention_partials_follow_the_widest_layer() {
        let s = Config::flash().shape();
        let small = flash_q2(32768, 139.0, 139.8).bytes(MemClass::AttentionScratch);
        let want = crate::attention::scratch_bytes(s.n_head, s.head_dim, 8, 128 + 512).max(
            crate::attention::scratch_bytes(s.n_head, s.head_dim, 8, 128 + 32768 / 128 + 1),
        );
        assert_eq!(small, want as u64);
        let big = flash_q2(MAX_CONTEXT, 139.0, 139.8).bytes(MemClass::AttentionScratch);
        let want_big =
            crate::attention::scratch_bytes(s.n_head, s.head_dim, 8, 128 + MAX_CONTEXT / 128 + 1);
        assert_eq!(big, want_big as u64);
        assert!(big > small);
    }

    /// With the weights leaving ~10 GiB, only part of the 1M context fits, and the
    /// search finds the exact frontier.
    #[test]
    fn max_ctx_is_the_frontier() {
        let plan = flash_q2(MAX_CONTEXT, 95.0, 96.0);
        assert!(!plan.fits());
        let m = plan.max_ctx_that_fits().unwrap();
        assert!(m > 32768 && m < MAX_CONTEXT, "{m}");
        assert!(plan.at_ctx(m).fits());
        assert!(!plan.at_ctx(m + 1).fits());
        let err = plan.check().unwrap_err().to_string();
        assert!(
            err.contains(&format!("the largest context that fits is {m} tokens")),
            "{err}"
        );
        let need = format!("needs {:.1} GiB", gib(plan.need_bytes()));
        assert!(err.contains(&need), "{err}");
        assert!(err.contains("95.0 GiB free"), "{err}");
        assert!(
            err.contains(&format!(
                "weights alone {:.1} GiB",
                gib(plan.weight_bytes())
            )),
            "{err}"
        );
    }

    #[test]
    fn max_ctx_grows_with_free_memory() {
        let mut last = 0usize;
        for free in [90.0, 92.0, 95.0, 100.0, 110.0] {
            let m = flash_q2(4096, free, 120.0).max_ctx_that_fits().unwrap();
            assert!(m >= last, "{free} GiB: {m} < {last}");
            last = m;
        }
        // Needed bytes never shrink as the context grows.
        let plan = flash_q2(1, 100.0, 120.0);
        let mut prev = 0;
        for ctx in [1, 2, 127, 128, 129, 4096, 65536, 1 << 20] {
            let n = plan.at_ctx(ctx).need_bytes();
            assert!(n >= prev, "ctx {ctx}");
            prev = n;
        }
    }

    /// The §15 tiny model: every term by hand.
    #[test]
    fn tiny_shape_terms() {
        let cfg = Config::tiny();
        let s = cfg.shape();
        let tensors = tensor_list(&cfg, ExpertTypes::Q4);
        let total: u64 = tensors.iter().map(|t| t.2).sum();
        let dev = DeviceMemory {
            free: 2 * GIB,
            total: 2 * GIB,
        };
        let plan = MemoryPlan::new(&s, &tensors, 1000, 64, dev);
        assert_eq!(plan.weight_bytes(), total);
        assert_eq!(
            plan.bytes(MemClass::KvState),
            u(HostKv::estimate_bytes(&s, 1000))
        );
        // Model::alloc_buffers columns, written out.
        let (e, ff, kk) = (u(s.n_embd), u(s.n_ff_exp), u(s.n_expert_used));
        let cols = u(s.hc_dim() + s.hc_mult + s.hc_mult * s.hc_mult + s.q_lora_rank)
            + 2 * u(s.q_dim())
            // kvr, then comp_kv / comp_score / icomp_kv / icomp_score (2·head_dim each)
            + u(s.head_dim * 9)
            + u(s.indexer_heads * (s.indexer_dim + 1))
            + u(s.o_groups * s.o_lora_rank)
            + 3 * e
            + u(s.vocab + s.indexer_top_k);
        let mut widths = vec![u(s.hc_dim()), e, u(s.q_lora_rank), u(s.q_dim()), ff];
        widths.sort_unstable();
        widths.dedup();
        let k: u64 = widths.iter().sum();
        assert_eq!(
            plan.bytes(MemClass::Activations),
            64 * cols * 4 + 64 * k + 2 * (64 * k / 8)
        );
        let moe_cols = u(s.n_expert) + 2 * kk + 3 * kk * ff + kk * e + 3 * ff + 2 * e;
        let staging =
            u(s.q_dim() + s.o_groups * s.o_lora_rank + s.hc_mix()) + widths[widths.len() - 1];
        assert_eq!(
            plan.bytes(MemClass::MoeScratch),
            64 * (moe_cols + staging) * 4
        );
        // CSA ratio 4: 1000/4 + 1 rows scored for 64 tokens at a time.
        assert_eq!(plan.bytes(MemClass::IndexerScratch), 251 * 64 * 4);
        assert_eq!(plan.bytes(MemClass::SafetyMargin), 2 * GIB / 100 * 2);
        let sum: u64 = plan.items.iter().map(|i| i.bytes).sum();
        assert_eq!(plan.need_bytes(), sum);
        assert!(plan.fits());
        // The reserve alone exceeds half a GiB: nothing fits then.
        let small = MemoryPlan::new(&s, &tensors, 1000, 64, DeviceMemory::gib(0.5, 0.5));
        assert!(!small.fits());
        assert_eq!(small.max_ctx_that_fits(), None);
        // A chunk larger than the context is clamped to it.
        let clamped = MemoryPlan::new(&s, &tensors, 10, 4096, dev);
        assert_eq!(
            clamped.bytes(MemClass::MoeScratch),
            10 * (moe_cols + staging) * 4
        );
        assert_eq!(
            clamped.bytes(MemClass::IndexerScratch),
            (10 / 4 + 1) * 10 * 4
        );
    }

    #[test]
    fn display_is_a_table_with_a_total() {
        let text = flash_q2(32768, 78.1, 79.1).to_string();
        assert!(text.contains("routed experts"), "{text}");
        assert!(text.contains("KV state"), "{text}");
        assert!(text.contains("of 78.1 GiB free"), "{text}");
        assert!(text.contains("does NOT fit"), "{text}");
        // Every table row has its share column aligned at the same place.
        let ends: Vec<usize> = text
            .lines()
            .filter(|l| l.ends_with('%'))
            .map(str::len)
            .collect();
        assert!(ends.len() >= 12, "{text}");
        assert!(ends.iter().all(|&e| e == ends[0]), "{text}");
    }
}
