//! The hyperparameters the forward pass needs, in one flat struct. It is filled from the
//! validated `Config` (GGUF metadata) and is deliberately independent of how the
//! metadata is spelled, so tests can build tiny shapes directly.

use crate::numerics::RopeFreqs;

/// Attention type of one layer (model.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Raw sliding window only.
    Sliding,
    /// Compressed sparse attention: overlapping pooling (coff 2) + lightning indexer.
    Csa { ratio: usize },
    /// Heavily compressed attention: non-overlapping pooling, all rows visible.
    Hca { ratio: usize },
}

impl LayerKind {
    pub fn ratio(self) -> usize {
        match self {
            LayerKind::Sliding => 0,
            LayerKind::Csa { ratio } | LayerKind::Hca { ratio } => ratio,
        }
    }
    pub fn is_compressed(self) -> bool {
        !matches!(self, LayerKind::Sliding)
    }
    pub fn is_csa(self) -> bool {
        matches!(self, LayerKind::Csa { .. })
    }
    /// coff: 2 for CSA (overlap), 1 for HCA.
    pub fn coff(self) -> usize {
        if self.is_csa() { 2 } else { 1 }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub n_layer: usize,
    pub n_embd: usize,
    pub vocab: usize,
    pub n_head: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    pub q_lora_rank: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_ff_exp: usize,
    pub n_hash_layers: usize,
    pub sliding_window: usize,
    pub layer_kinds: Vec<LayerKind>,
    pub indexer_heads: usize,
    pub indexer_dim: usize,
    pub indexer_top_k: usize,
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub compress_rope_base: f32,
    pub yarn_factor: f32,
    pub yarn_orig_ctx: f32,
    pub yarn_beta_fast: f32,
    pub yarn_beta_slow: f32,
    pub expert_weights_scale: f32,
    pub expert_weights_norm: bool,
    /// Per-layer SwiGLU clamp.
    pub swiglu_clamp: Vec<f32>,
}

impl ModelShape {
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn n_nope(&self) -> usize {
        self.head_dim - self.n_rot
    }
    pub fn hc_dim(&self) -> usize {
        self.hc_mult * self.n_embd
    }
    pub fn hc_mix(&self) -> usize {
        (2 + self.hc_mult) * self.hc_mult
    }
    pub fn is_hash_layer(&self, il: usize) -> bool {
        il < self.n_hash_layers
    }
    pub fn rope_plain(&self) -> RopeFreqs {
        RopeFreqs::plain(self.rope_base, self.n_rot)
    }
    pub fn rope_compress(&self) -> RopeFreqs {
        RopeFreqs::yarn(
            self.compress_rope_base,
            self.n_rot,
            self.yarn_factor,
            self.yarn_orig_ctx,
            self.yarn_beta_fast,
            self.yarn_beta_slow,
        )
    }

    /// Structural invariants the forward pass relies on (model.md §15). Errors name the
    /// offending quantity.
    pub fn validate(&self) -> Result<(), String> {
        let chk = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
        chk(
            self.n_layer > 0 && self.layer_kinds.len() == self.n_layer,
            "layer_kinds length != n_layer",
        )?;
        chk(
            self.swiglu_clamp.len() >= self.n_layer,
            "swiglu_clamp shorter than n_layer",
        )?;
        chk(
            self.n_rot.is_multiple_of(2) && self.n_rot <= self.head_dim,
            "n_rot must be even and <= head_dim",
        )?;
        chk(
            self.n_nope().is_multiple_of(64),
            "head_dim - n_rot must be a multiple of 64 (FP8 blocks)",
        )?;
        chk(
            self.o_groups > 0 && self.n_head.is_multiple_of(self.o_groups),
            "n_head % o_groups != 0",
        )?;
        chk(
            self.hc_mult > 0 && self.hc_sinkhorn_iters > 0,
            "hc_mult / sinkhorn iterations",
        )?;
        chk(
            self.n_expert_used > 0 && self.n_expert_used <= self.n_expert,
            "expert_used_count",
        )?;
        chk(self.sliding_window > 0, "sliding_window must be > 0")?;
        for (il, k) in self.layer_kinds.iter().enumerate() {
            if k.is_compressed() && (k.ratio() == 0 || k.ratio() > self.sliding_window) {
                return Err(format!(
                    "layer {il}: compress ratio must be in 1..=sliding_window"
                ));
            }
            if k.is_csa() && (self.indexer_dim != 128 || self.n_rot > self.indexer_dim) {
                return Err(format!("layer {il}: indexer head dim must be 128"));
            }
        }
        Ok(())
    }
}
