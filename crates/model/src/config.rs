//! Model hyperparameters read from GGUF metadata (model.md §4.2), with the typed-getter
//! strictness of ds4 and the structural invariants of model.md §15.
//!
//! Unlike ds4, no Flash constant is required: any dimensions the metadata describes are
//! accepted if they are internally consistent (tiny test models use 6 layers, n_embd 256…).
//! [`Config::flash_mismatches`] lists where a file differs from real DeepSeek V4 Flash.

use ds4_gguf::{GgufFile, Value};

use crate::shape::{LayerKind, ModelShape};

/// Metadata key prefix of the architecture.
pub const ARCH: &str = "deepseek4";

/// Why a config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required key is missing or has a type the strict getter does not accept.
    #[error(transparent)]
    Metadata(#[from] ds4_gguf::Error),
    #[error("key \"{key}\": {len} entries, need at least {need} (one per layer)")]
    ShortArray {
        key: String,
        len: usize,
        need: usize,
    },
    #[error("key \"{key}\": value {value} does not fit in usize")]
    TooLarge { key: String, value: u64 },
    /// Every broken invariant, in one message.
    #[error("inconsistent model config: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl From<ConfigError> for crate::Error {
    fn from(e: ConfigError) -> Self {
        crate::Error::Config(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// The hyperparameters of one DeepSeek V4 file. Per-layer arrays hold exactly `n_layer`
/// entries (extra file entries are ignored, as ds4 does).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub architecture: Option<String>,
    pub name: Option<String>,
    pub n_layer: usize,
    pub n_embd: usize,
    pub vocab: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    pub n_rot: usize,
    pub q_lora_rank: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_expert_shared: usize,
    /// Expert FFN width (routed and shared).
    pub ffn_width: usize,
    pub expert_group_count: usize,
    pub expert_group_used_count: usize,
    pub n_hash_layers: usize,
    pub sliding_window: usize,
    pub compress_ratios: Vec<usize>,
    pub swiglu_clamp: Vec<f32>,
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
    pub yarn_orig_ctx: u64,
    pub yarn_beta_fast: f32,
    pub yarn_beta_slow: f32,
    pub expert_weights_scale: f32,
    pub expert_weights_norm: bool,
    /// Printed only (ds4 does not check it); `None` when absent.
    pub context_length: Option<u64>,
    /// Length of `tokenizer.ggml.tokens` (== vocab).
    pub n_tokens: usize,
    /// Length of `tokenizer.ggml.merges`.
    pub n_merges: usize,
}

/// One place where a file differs from DeepSeek V4 Flash (model.md §2).
#[derive(Debug, Clone, PartialEq)]
pub struct FlashMismatch {
    pub what: String,
    pub expected: String,
    pub got: String,
}

impl std::fmt::Display for FlashMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (Flash: {})", self.what, self.got, self.expected)
    }
}

fn key(name: &str) -> String {
    format!("{ARCH}.{name}")
}

struct Reader<'a> {
    file: &'a GgufFile,
}

impl Reader<'_> {
    fn usize_u32(&self, name: &str) -> Result<usize> {
        let k = key(name);
        let v = self.file.get_u32(&k)?;
        usize::try_from(v).map_err(|_| ConfigError::TooLarge {
            key: k,
            value: u64::from(v),
        })
    }
    /// Optional u32 key whose absence counts as 0.
    fn usize_u32_or_zero(&self, name: &str) -> Result<usize> {
        if self.file.get(&key(name)).is_none() {
            return Ok(0);
        }
        self.usize_u32(name)
    }
    fn f32(&self, name: &str) -> Result<f32> {
        Ok(self.file.get_f32(&key(name))?)
    }
    fn per_layer<T>(&self, name: &str, n_layer: usize, items: Vec<T>) -> Result<Vec<T>> {
        if items.len() < n_layer {
            return Err(ConfigError::ShortArray {
                key: key(name),
                len: items.len(),
                need: n_layer,
            });
        }
        let mut items = items;
        items.truncate(n_layer);
        Ok(items)
    }
}

impl Config {
    /// Reads and validates every key of model.md §4.2, plus the tensor-derived sizes
    /// that the metadata must agree with (token embedding and output head).
    pub fn from_gguf(file: &GgufFile) -> Result<Config> {
        let r = Reader { file };
        let n_layer = r.usize_u32("block_count")?;
        let ratios = file.get_u32_array(&key("attention.compress_ratios"))?;
        let ratios = r.per_layer("attention.compress_ratios", n_layer, ratios)?;
        let clamps = file.get_f32_array(&key("swiglu_clamp_exp"))?;
        let swiglu_clamp = r.per_layer("swiglu_clamp_exp", n_layer, clamps)?;
        let optional_str = |k: &str| -> Result<Option<String>> {
            match file.get(k) {
                None => Ok(None),
                Some(_) => Ok(Some(file.get_str(k)?.to_string())),
            }
        };
        let context_length = match file.get(&key("context_length")) {
            None => None,
            Some(_) => Some(file.get_u64(&key("context_length"))?),
        };
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let merges = file.get_str_array("tokenizer.ggml.merges")?;
        let cfg = Config {
            architecture: optional_str("general.architecture")?,
            name: optional_str("general.name")?,
            n_layer,
            n_embd: r.usize_u32("embedding_length")?,
            vocab: r.usize_u32("vocab_size")?,
            n_head: r.usize_u32("attention.head_count")?,
            n_head_kv: r.usize_u32("attention.head_count_kv")?,
            head_dim: r.usize_u32("attention.key_length")?,
            value_dim: r.usize_u32("attention.value_length")?,
            n_rot: r.usize_u32("rope.dimension_count")?,
            q_lora_rank: r.usize_u32("attention.q_lora_rank")?,
            o_groups: r.usize_u32("attention.output_group_count")?,
            o_lora_rank: r.usize_u32("attention.output_lora_rank")?,
            n_expert: r.usize_u32("expert_count")?,
            n_expert_used: r.usize_u32("expert_used_count")?,
            n_expert_shared: r.usize_u32("expert_shared_count")?,
            ffn_width: r.usize_u32("expert_feed_forward_length")?,
            expert_group_count: r.usize_u32_or_zero("expert_group_count")?,
            expert_group_used_count: r.usize_u32_or_zero("expert_group_used_count")?,
            n_hash_layers: r.usize_u32("hash_layer_count")?,
            sliding_window: r.usize_u32("attention.sliding_window")?,
            compress_ratios: ratios.into_iter().map(|x| x as usize).collect(),
            swiglu_clamp,
            indexer_heads: r.usize_u32("attention.indexer.head_count")?,
            indexer_dim: r.usize_u32("attention.indexer.key_length")?,
            indexer_top_k: r.usize_u32("attention.indexer.top_k")?,
            hc_mult: r.usize_u32("hyper_connection.count")?,
            hc_sinkhorn_iters: r.usize_u32("hyper_connection.sinkhorn_iterations")?,
            hc_eps: r.f32("hyper_connection.epsilon")?,
            rms_eps: r.f32("attention.layer_norm_rms_epsilon")?,
            rope_base: r.f32("rope.freq_base")?,
            compress_rope_base: r.f32("attention.compress_rope_freq_base")?,
            yarn_factor: r.f32("rope.scaling.factor")?,
            yarn_orig_ctx: file.get_u64(&key("rope.scaling.original_context_length"))?,
            yarn_beta_fast: r.f32("rope.scaling.yarn_beta_fast")?,
            yarn_beta_slow: r.f32("rope.scaling.yarn_beta_slow")?,
            expert_weights_scale: r.f32("expert_weights_scale")?,
            expert_weights_norm: file.get_bool(&key("expert_weights_norm"))?,
            context_length,
            n_tokens: tokens.len(),
            n_merges: merges.len(),
        };
        let mut problems = cfg.invariant_violations();
        problems.extend(cfg.tensor_disagreements(file));
        if let Some(Value::String(arch)) = file.get("general.architecture")
            && arch != ARCH
        {
            // ds4 does not check it either; the keys above already matched.
            tracing::warn!("general.architecture is \"{arch}\", not \"{ARCH}\"");
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// DeepSeek V4 Flash (model.md §2).
    pub fn flash() -> Config {
        Config {
            architecture: Some(ARCH.into()),
            name: None,
            n_layer: 43,
            n_embd: 4096,
            vocab: 129_280,
            n_head: 64,
            n_head_kv: 1,
            head_dim: 512,
            value_dim: 512,
            n_rot: 64,
            q_lora_rank: 1024,
            o_groups: 8,
            o_lora_rank: 1024,
            n_expert: 256,
            n_expert_used: 6,
            n_expert_shared: 1,
            ffn_width: 2048,
            expert_group_count: 0,
            expert_group_used_count: 0,
            n_hash_layers: 3,
            sliding_window: 128,
            compress_ratios: flash_compress_ratios(),
            swiglu_clamp: vec![10.0; 43],
            indexer_heads: 64,
            indexer_dim: 128,
            indexer_top_k: 512,
            hc_mult: 4,
            hc_sinkhorn_iters: 20,
            hc_eps: 1e-6,
            rms_eps: 1e-6,
            rope_base: 10000.0,
            compress_rope_base: 160_000.0,
            yarn_factor: 16.0,
            yarn_orig_ctx: 65536,
            yarn_beta_fast: 32.0,
            yarn_beta_slow: 1.0,
            expert_weights_scale: 1.5,
            expert_weights_norm: true,
            context_length: Some(1 << 20),
            n_tokens: 129_280,
            n_merges: 127_741,
        }
    }

    /// The recommended tiny test configuration (model.md §15): 6 layers
    /// [SWA, SWA, CSA, HCA 16, CSA, HCA 16], n_embd 256, vocab 512.
    pub fn tiny() -> Config {
        Config {
            name: Some("tiny".into()),
            n_layer: 6,
            n_embd: 256,
            vocab: 512,
            n_head: 4,
            head_dim: 256,
            value_dim: 256,
            q_lora_rank: 128,
            o_groups: 2,
            o_lora_rank: 128,
            n_expert: 16,
            ffn_width: 256,
            sliding_window: 16,
            compress_ratios: vec![0, 0, 4, 16, 4, 16],
            swiglu_clamp: vec![1.0; 6],
            indexer_heads: 4,
            indexer_top_k: 4,
            context_length: Some(4096),
            n_tokens: 512,
            n_merges: 0,
            ..Config::flash()
        }
    }

    /// The metadata records (model.md §4.2, without the tokenizer) that describe this
    /// config, with the types ds4 and the converter write.
    pub fn to_metadata(&self) -> Vec<(String, Value)> {
        use ds4_gguf::ValueType;
        let u = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
        let mut out = Vec::new();
        if let Some(a) = &self.architecture {
            out.push(("general.architecture".to_string(), Value::String(a.clone())));
        }
        if let Some(n) = &self.name {
            out.push(("general.name".to_string(), Value::String(n.clone())));
        }
        let mut put = |k: &str, v: Value| out.push((key(k), v));
        if let Some(c) = self.context_length {
            put("context_length", Value::U64(c));
        }
        put("block_count", u(self.n_layer));
        put("embedding_length", u(self.n_embd));
        put("vocab_size", u(self.vocab));
        put("attention.head_count", u(self.n_head));
        put("attention.head_count_kv", u(self.n_head_kv));
        put("attention.key_length", u(self.head_dim));
        put("attention.value_length", u(self.value_dim));
        put("rope.dimension_count", u(self.n_rot));
        put("attention.q_lora_rank", u(self.q_lora_rank));
        put("attention.output_lora_rank", u(self.o_lora_rank));
        put("attention.output_group_count", u(self.o_groups));
        put("expert_count", u(self.n_expert));
        put("expert_used_count", u(self.n_expert_used));
        put("expert_feed_forward_length", u(self.ffn_width));
        put("expert_shared_count", u(self.n_expert_shared));
        put("expert_group_count", u(self.expert_group_count));
        put("expert_group_used_count", u(self.expert_group_used_count));
        put("hash_layer_count", u(self.n_hash_layers));
        put("attention.sliding_window", u(self.sliding_window));
        put(
            "attention.compress_ratios",
            Value::array(
                ValueType::U32,
                self.compress_ratios.iter().map(|&r| u(r)).collect(),
            ),
        );
        put(
            "swiglu_clamp_exp",
            Value::array(
                ValueType::F32,
                self.swiglu_clamp.iter().map(|&c| Value::F32(c)).collect(),
            ),
        );
        put("attention.indexer.head_count", u(self.indexer_heads));
        put("attention.indexer.key_length", u(self.indexer_dim));
        put("attention.indexer.top_k", u(self.indexer_top_k));
        put("hyper_connection.count", u(self.hc_mult));
        put(
            "hyper_connection.sinkhorn_iterations",
            u(self.hc_sinkhorn_iters),
        );
        put("hyper_connection.epsilon", Value::F32(self.hc_eps));
        put("attention.layer_norm_rms_epsilon", Value::F32(self.rms_eps));
        put("rope.freq_base", Value::F32(self.rope_base));
        put(
            "attention.compress_rope_freq_base",
            Value::F32(self.compress_rope_base),
        );
        put("rope.scaling.factor", Value::F32(self.yarn_factor));
        put(
            "rope.scaling.original_context_length",
            Value::U64(self.yarn_orig_ctx),
        );
        put(
            "rope.scaling.yarn_beta_fast",
            Value::F32(self.yarn_beta_fast),
        );
        put(
            "rope.scaling.yarn_beta_slow",
            Value::F32(self.yarn_beta_slow),
        );
        put(
            "expert_weights_scale",
            Value::F32(self.expert_weights_scale),
        );
        put("expert_weights_norm", Value::Bool(self.expert_weights_norm));
        out
    }

    /// Attention type of layer `il`: ratio 0 → sliding, 4 → CSA (overlapping pooling +
    /// indexer), any other ratio → HCA. Matches transformers' `layer_types` for both the
    /// Flash schedule and the tiny configs (compress_rates {csa: 4, hca: R}).
    pub fn layer_kind(&self, il: usize) -> Option<LayerKind> {
        self.compress_ratios
            .get(il)
            .map(|&ratio| kind_of_ratio(ratio))
    }

    pub fn layer_kinds(&self) -> Vec<LayerKind> {
        self.compress_ratios
            .iter()
            .map(|&r| kind_of_ratio(r))
            .collect()
    }

    pub fn compress_ratio(&self, il: usize) -> Option<usize> {
        self.compress_ratios.get(il).copied()
    }

    /// Layers below `hash_layer_count` route with the token-id table (tid2eid).
    pub fn is_hash_layer(&self, il: usize) -> bool {
        il < self.n_hash_layers
    }

    pub fn has_csa(&self) -> bool {
        self.layer_kinds().iter().any(|k| k.is_csa())
    }

    /// Query width: n_head · head_dim.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    /// Non-RoPE part of a head.
    pub fn n_nope(&self) -> usize {
        self.head_dim.saturating_sub(self.n_rot)
    }
    /// HC state width: hc_mult · n_embd.
    pub fn hc_dim(&self) -> usize {
        self.hc_mult * self.n_embd
    }
    /// HC mix outputs: 2N + N².
    pub fn hc_mix(&self) -> usize {
        (2 + self.hc_mult) * self.hc_mult
    }
    /// Heads per output group.
    pub fn heads_per_group(&self) -> usize {
        self.n_head.checked_div(self.o_groups).unwrap_or(0)
    }
    /// Input width of one output group: head_dim · n_head / o_groups.
    pub fn o_group_dim(&self) -> usize {
        self.head_dim * self.heads_per_group()
    }
    /// Output low-rank width: o_groups · o_lora_rank.
    pub fn o_low_dim(&self) -> usize {
        self.o_groups * self.o_lora_rank
    }
    /// Indexer query width: indexer_heads · indexer_dim.
    pub fn indexer_q_dim(&self) -> usize {
        self.indexer_heads * self.indexer_dim
    }

    /// The flat shape the forward pass uses.
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            vocab: self.vocab,
            n_head: self.n_head,
            head_dim: self.head_dim,
            n_rot: self.n_rot,
            q_lora_rank: self.q_lora_rank,
            o_groups: self.o_groups,
            o_lora_rank: self.o_lora_rank,
            n_expert: self.n_expert,
            n_expert_used: self.n_expert_used,
            n_ff_exp: self.ffn_width,
            n_hash_layers: self.n_hash_layers,
            sliding_window: self.sliding_window,
            layer_kinds: self.layer_kinds(),
            indexer_heads: self.indexer_heads,
            indexer_dim: self.indexer_dim,
            indexer_top_k: self.indexer_top_k,
            hc_mult: self.hc_mult,
            hc_sinkhorn_iters: self.hc_sinkhorn_iters,
            hc_eps: self.hc_eps,
            rms_eps: self.rms_eps,
            rope_base: self.rope_base,
            compress_rope_base: self.compress_rope_base,
            yarn_factor: self.yarn_factor,
            yarn_orig_ctx: self.yarn_orig_ctx as f32,
            yarn_beta_fast: self.yarn_beta_fast,
            yarn_beta_slow: self.yarn_beta_slow,
            expert_weights_scale: self.expert_weights_scale,
            expert_weights_norm: self.expert_weights_norm,
            swiglu_clamp: self.swiglu_clamp.clone(),
        }
    }

    /// The structural invariants the engine relies on (model.md §15 and internal
    /// consistency), each broken one as a readable sentence.
    pub fn invariant_violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut need = |ok: bool, msg: String| {
            if !ok {
                out.push(msg);
            }
        };
        for (name, v) in [
            ("block_count", self.n_layer),
            ("embedding_length", self.n_embd),
            ("vocab_size", self.vocab),
            ("attention.head_count", self.n_head),
            ("attention.key_length", self.head_dim),
            ("attention.q_lora_rank", self.q_lora_rank),
            ("attention.output_group_count", self.o_groups),
            ("attention.output_lora_rank", self.o_lora_rank),
            ("expert_count", self.n_expert),
            ("expert_used_count", self.n_expert_used),
            ("expert_feed_forward_length", self.ffn_width),
            ("attention.sliding_window", self.sliding_window),
            ("hyper_connection.count", self.hc_mult),
            (
                "hyper_connection.sinkhorn_iterations",
                self.hc_sinkhorn_iters,
            ),
        ] {
            need(v > 0, format!("{name} must be > 0"));
        }
        need(
            self.n_head_kv == 1,
            format!(
                "attention.head_count_kv is {}, the single shared KV head (K = V) needs 1",
                self.n_head_kv
            ),
        );
        need(
            self.value_dim == self.head_dim,
            format!(
                "attention.value_length {} != key_length {} (K = V)",
                self.value_dim, self.head_dim
            ),
        );
        need(
            self.n_rot.is_multiple_of(2) && self.n_rot <= self.head_dim,
            format!(
                "rope.dimension_count {} must be even and <= head dim {}",
                self.n_rot, self.head_dim
            ),
        );
        need(
            self.n_nope().is_multiple_of(64),
            format!(
                "head dim {} - rope dims {} = {} is not a multiple of 64 (FP8 KV blocks)",
                self.head_dim,
                self.n_rot,
                self.n_nope()
            ),
        );
        need(
            self.o_groups == 0 || self.n_head.is_multiple_of(self.o_groups),
            format!(
                "head_count {} is not divisible by output_group_count {}",
                self.n_head, self.o_groups
            ),
        );
        need(
            self.n_expert_used <= self.n_expert,
            format!(
                "expert_used_count {} > expert_count {}",
                self.n_expert_used, self.n_expert
            ),
        );
        need(
            self.n_expert_shared == 1,
            format!(
                "expert_shared_count is {}, the engine implements exactly 1 shared expert",
                self.n_expert_shared
            ),
        );
        need(
            self.expert_group_count == 0 && self.expert_group_used_count == 0,
            format!(
                "expert_group_count/used_count are {}/{}, group-limited routing is not supported (must be 0)",
                self.expert_group_count, self.expert_group_used_count
            ),
        );
        need(
            self.n_hash_layers <= self.n_layer,
            format!(
                "hash_layer_count {} > block_count {}",
                self.n_hash_layers, self.n_layer
            ),
        );
        for (il, &ratio) in self.compress_ratios.iter().enumerate() {
            need(
                ratio <= self.sliding_window,
                format!(
                    "layer {il}: compress ratio {ratio} > sliding_window {} (partial blocks must stay in the raw window)",
                    self.sliding_window
                ),
            );
        }
        if self.has_csa() {
            need(
                self.indexer_dim == 128,
                format!(
                    "indexer key_length is {}, CSA layers need 128 (Hadamard-128)",
                    self.indexer_dim
                ),
            );
            need(
                self.n_rot == 64,
                format!(
                    "rope.dimension_count is {}, the indexer RoPE part needs 64",
                    self.n_rot
                ),
            );
            need(
                self.indexer_heads > 0,
                "indexer head_count must be > 0 with CSA layers".into(),
            );
            need(
                self.indexer_top_k > 0,
                "indexer top_k must be > 0 with CSA layers".into(),
            );
        }
        for (il, &c) in self.swiglu_clamp.iter().enumerate() {
            need(
                c.is_finite() && c > 0.0,
                format!("layer {il}: swiglu clamp {c} must be finite and > 0"),
            );
        }
        for (name, v) in [
            ("hyper_connection.epsilon", self.hc_eps),
            ("attention.layer_norm_rms_epsilon", self.rms_eps),
            ("rope.freq_base", self.rope_base),
            ("attention.compress_rope_freq_base", self.compress_rope_base),
            ("rope.scaling.yarn_beta_fast", self.yarn_beta_fast),
            ("rope.scaling.yarn_beta_slow", self.yarn_beta_slow),
            ("expert_weights_scale", self.expert_weights_scale),
        ] {
            need(
                v.is_finite() && v > 0.0,
                format!("{name} = {v} must be finite and > 0"),
            );
        }
        need(
            self.yarn_factor.is_finite() && self.yarn_factor >= 1.0,
            format!("rope.scaling.factor = {} must be >= 1", self.yarn_factor),
        );
        need(
            self.yarn_orig_ctx > 0,
            "rope.scaling.original_context_length must be > 0".into(),
        );
        need(
            self.n_tokens == self.vocab,
            format!(
                "tokenizer.ggml.tokens has {} entries, vocab_size is {}",
                self.n_tokens, self.vocab
            ),
        );
        need(
            i32::try_from(self.n_tokens).is_ok(),
            format!(
                "tokenizer.ggml.tokens has {} entries (> INT32_MAX)",
                self.n_tokens
            ),
        );
        out
    }

    /// Sizes the metadata states that the tensor table contradicts.
    fn tensor_disagreements(&self, file: &GgufFile) -> Vec<String> {
        let mut out = Vec::new();
        for name in ["token_embd.weight", "output.weight"] {
            if let Some(t) = file.tensor(name) {
                let want = [self.n_embd as u64, self.vocab as u64];
                if t.dims != want {
                    out.push(format!(
                        "{name} dims {:?} disagree with [embedding_length, vocab_size] = {want:?}",
                        t.dims
                    ));
                }
            }
        }
        out
    }

    /// Where this config differs from DeepSeek V4 Flash (model.md §2). Empty for Flash.
    pub fn flash_mismatches(&self) -> Vec<FlashMismatch> {
        let mut out = Vec::new();
        let mut int = |what: &str, got: u64, expected: u64| {
            if got != expected {
                out.push(FlashMismatch {
                    what: key(what),
                    expected: expected.to_string(),
                    got: got.to_string(),
                });
            }
        };
        int("block_count", self.n_layer as u64, 43);
        int("embedding_length", self.n_embd as u64, 4096);
        int("vocab_size", self.vocab as u64, 129_280);
        int("attention.head_count", self.n_head as u64, 64);
        int("attention.head_count_kv", self.n_head_kv as u64, 1);
        int("attention.key_length", self.head_dim as u64, 512);
        int("attention.value_length", self.value_dim as u64, 512);
        int("rope.dimension_count", self.n_rot as u64, 64);
        int("attention.q_lora_rank", self.q_lora_rank as u64, 1024);
        int("attention.output_lora_rank", self.o_lora_rank as u64, 1024);
        int("attention.output_group_count", self.o_groups as u64, 8);
        int("expert_count", self.n_expert as u64, 256);
        int("expert_used_count", self.n_expert_used as u64, 6);
        int("expert_feed_forward_length", self.ffn_width as u64, 2048);
        int("expert_shared_count", self.n_expert_shared as u64, 1);
        int("hash_layer_count", self.n_hash_layers as u64, 3);
        int("expert_group_count", self.expert_group_count as u64, 0);
        int(
            "expert_group_used_count",
            self.expert_group_used_count as u64,
            0,
        );
        int("attention.sliding_window", self.sliding_window as u64, 128);
        int(
            "attention.indexer.head_count",
            self.indexer_heads as u64,
            64,
        );
        int("attention.indexer.key_length", self.indexer_dim as u64, 128);
        int("attention.indexer.top_k", self.indexer_top_k as u64, 512);
        int("hyper_connection.count", self.hc_mult as u64, 4);
        int(
            "hyper_connection.sinkhorn_iterations",
            self.hc_sinkhorn_iters as u64,
            20,
        );
        int(
            "rope.scaling.original_context_length",
            self.yarn_orig_ctx,
            65536,
        );
        let flash_ratios = flash_compress_ratios();
        if self.compress_ratios != flash_ratios {
            out.push(FlashMismatch {
                what: key("attention.compress_ratios"),
                expected: "[0, 0, 4, 128, 4, …, 4] (43 layers)".into(),
                got: format!("{:?}", self.compress_ratios),
            });
        }
        if self.swiglu_clamp.len() != 43 || self.swiglu_clamp.iter().any(|&c| !close(c, 10.0)) {
            out.push(FlashMismatch {
                what: key("swiglu_clamp_exp"),
                expected: "10.0 for all 43 layers".into(),
                got: summarize(&self.swiglu_clamp),
            });
        }
        let mut float = |what: &str, got: f32, expected: f32| {
            if !close(got, expected) {
                out.push(FlashMismatch {
                    what: key(what),
                    expected: expected.to_string(),
                    got: got.to_string(),
                });
            }
        };
        float("rope.freq_base", self.rope_base, 10000.0);
        float("rope.scaling.factor", self.yarn_factor, 16.0);
        float("rope.scaling.yarn_beta_fast", self.yarn_beta_fast, 32.0);
        float("rope.scaling.yarn_beta_slow", self.yarn_beta_slow, 1.0);
        float(
            "attention.compress_rope_freq_base",
            self.compress_rope_base,
            160_000.0,
        );
        float("expert_weights_scale", self.expert_weights_scale, 1.5);
        float("attention.layer_norm_rms_epsilon", self.rms_eps, 1e-6);
        float("hyper_connection.epsilon", self.hc_eps, 1e-6);
        if !self.expert_weights_norm {
            out.push(FlashMismatch {
                what: key("expert_weights_norm"),
                expected: "true".into(),
                got: "false".into(),
            });
        }
        out
    }

    /// True when every hyperparameter equals DeepSeek V4 Flash's.
    pub fn is_flash(&self) -> bool {
        self.flash_mismatches().is_empty()
    }
}

fn kind_of_ratio(ratio: usize) -> LayerKind {
    match ratio {
        0 => LayerKind::Sliding,
        4 => LayerKind::Csa { ratio },
        _ => LayerKind::Hca { ratio },
    }
}

/// Flash's schedule (model.md §3): 0 for layers 0–1, then 4 (even) / 128 (odd).
pub fn flash_compress_ratios() -> Vec<usize> {
    (0..43)
        .map(|il| match il {
            0 | 1 => 0,
            _ if il % 2 == 0 => 4,
            _ => 128,
        })
        .collect()
}

/// ds4's float comparison (`config_expect_f32`).
fn close(got: f32, expected: f32) -> bool {
    (got - expected).abs() <= expected.abs().max(1.0) * 1e-6
}

fn summarize(v: &[f32]) -> String {
    let mut distinct: Vec<f32> = Vec::new();
    for &x in v {
        if !distinct.contains(&x) {
            distinct.push(x);
        }
    }
    format!("{} layers, values {distinct:?}", v.len())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layout::test_files::{file, tiny_file, writer};
    use ds4_gguf::{GgufWriter, ValueType};

    fn arr_u32(v: &[u32]) -> Value {
        Value::array(ValueType::U32, v.iter().map(|&x| Value::U32(x)).collect())
    }

    /// Metadata written key by key (not through `to_metadata`), every value distinct
    /// where the invariants allow, in the alternative accepted types.
    fn hand_written() -> GgufWriter {
        let mut w = GgufWriter::new();
        let mut put = |k: &str, v: Value| w.add_kv(k, v);
        put("general.architecture", Value::String("deepseek4".into()));
        put("general.name", Value::String("hand".into()));
        put("deepseek4.context_length", Value::U32(9999));
        put("deepseek4.block_count", Value::U32(6));
        put("deepseek4.embedding_length", Value::U32(256));
        put("deepseek4.vocab_size", Value::U32(3));
        put("deepseek4.attention.head_count", Value::U32(4));
        put("deepseek4.attention.head_count_kv", Value::U32(1));
        put("deepseek4.attention.key_length", Value::U32(192));
        put("deepseek4.attention.value_length", Value::U32(192));
        put("deepseek4.rope.dimension_count", Value::U32(64));
        put("deepseek4.attention.q_lora_rank", Value::U32(96));
        put("deepseek4.attention.output_lora_rank", Value::U32(80));
        put("deepseek4.attention.output_group_count", Value::U32(2));
        put("deepseek4.expert_count", Value::U32(16));
        put("deepseek4.expert_used_count", Value::U32(5));
        put("deepseek4.expert_feed_forward_length", Value::U32(512));
        put("deepseek4.expert_shared_count", Value::U32(1));
        put("deepseek4.hash_layer_count", Value::U32(2));
        put("deepseek4.attention.sliding_window", Value::U32(32));
        // i32 array, longer than n_layer: the tail is ignored.
        put(
            "deepseek4.attention.compress_ratios",
            Value::array(
                ValueType::I32,
                [0, 0, 4, 32, 4, 8, 99]
                    .iter()
                    .map(|&x| Value::I32(x))
                    .collect(),
            ),
        );
        put(
            "deepseek4.swiglu_clamp_exp",
            Value::array(
                ValueType::F64,
                (0..6).map(|i| Value::F64(1.0 + f64::from(i))).collect(),
            ),
        );
        put("deepseek4.attention.indexer.head_count", Value::U32(3));
        put("deepseek4.attention.indexer.key_length", Value::U32(128));
        put("deepseek4.attention.indexer.top_k", Value::U32(7));
        put("deepseek4.hyper_connection.count", Value::U32(4));
        put(
            "deepseek4.hyper_connection.sinkhorn_iterations",
            Value::U32(11),
        );
        put("deepseek4.hyper_connection.epsilon", Value::F64(2e-6));
        put(
            "deepseek4.attention.layer_norm_rms_epsilon",
            Value::F32(3e-6),
        );
        put("deepseek4.rope.freq_base", Value::U32(20000));
        put(
            "deepseek4.attention.compress_rope_freq_base",
            Value::I32(150_000),
        );
        put("deepseek4.rope.scaling.factor", Value::F32(8.0));
        put(
            "deepseek4.rope.scaling.original_context_length",
            Value::U32(4096),
        );
        put("deepseek4.rope.scaling.yarn_beta_fast", Value::F32(31.0));
        put("deepseek4.rope.scaling.yarn_beta_slow", Value::F32(2.0));
        put("deepseek4.expert_weights_scale", Value::F32(2.5));
        put("deepseek4.expert_weights_norm", Value::Bool(false));
        let toks = ["a", "b", "c"]
            .iter()
            .map(|s| Value::String((*s).into()))
            .collect();
        put(
            "tokenizer.ggml.tokens",
            Value::array(ValueType::String, toks),
        );
        put(
            "tokenizer.ggml.merges",
            Value::array(ValueType::String, vec![Value::String("a b".into())]),
        );
        w
    }

    #[test]
    fn reads_every_key() {
        let c = Config::from_gguf(&file(&hand_written())).unwrap();
        assert_eq!(c.architecture.as_deref(), Some("deepseek4"));
        assert_eq!(c.name.as_deref(), Some("hand"));
        assert_eq!(c.context_length, Some(9999));
        assert_eq!(
            (c.n_layer, c.n_embd, c.vocab, c.n_head, c.n_head_kv),
            (6, 256, 3, 4, 1)
        );
        assert_eq!((c.head_dim, c.value_dim, c.n_rot), (192, 192, 64));
        assert_eq!((c.q_lora_rank, c.o_lora_rank, c.o_groups), (96, 80, 2));
        assert_eq!(
            (c.n_expert, c.n_expert_used, c.ffn_width, c.n_expert_shared),
            (16, 5, 512, 1)
        );
        assert_eq!((c.expert_group_count, c.expert_group_used_count), (0, 0));
        assert_eq!((c.n_hash_layers, c.sliding_window), (2, 32));
        assert_eq!(c.compress_ratios, vec![0, 0, 4, 32, 4, 8]);
        assert_eq!(c.swiglu_clamp, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(
            (c.indexer_heads, c.indexer_dim, c.indexer_top_k),
            (3, 128, 7)
        );
        assert_eq!((c.hc_mult, c.hc_sinkhorn_iters), (4, 11));
        assert_eq!((c.hc_eps, c.rms_eps), (2e-6, 3e-6));
        assert_eq!((c.rope_base, c.compress_rope_base), (20000.0, 150_000.0));
        assert_eq!((c.yarn_factor, c.yarn_orig_ctx), (8.0, 4096));
        assert_eq!((c.yarn_beta_fast, c.yarn_beta_slow), (31.0, 2.0));
        assert_eq!(
            (c.expert_weights_scale, c.expert_weights_norm),
            (2.5, false)
        );
        assert_eq!((c.n_tokens, c.n_merges), (3, 1));
        // Derived helpers.
        assert_eq!(c.q_dim(), 768);
        assert_eq!(c.n_nope(), 128);
        assert_eq!(c.hc_dim(), 1024);
        assert_eq!(c.hc_mix(), 24);
        assert_eq!(c.o_group_dim(), 384);
        assert_eq!(c.o_low_dim(), 160);
        assert_eq!(c.indexer_q_dim(), 384);
        assert!(c.is_hash_layer(1) && !c.is_hash_layer(2));
        assert_eq!(c.layer_kind(0), Some(LayerKind::Sliding));
        assert_eq!(c.layer_kind(2), Some(LayerKind::Csa { ratio: 4 }));
        assert_eq!(c.layer_kind(3), Some(LayerKind::Hca { ratio: 32 }));
        assert_eq!(c.layer_kind(5), Some(LayerKind::Hca { ratio: 8 }));
        assert_eq!(c.layer_kind(6), None);
        assert!(!c.is_flash());
    }

    #[test]
    fn strict_types() {
        let cases: Vec<(&str, Value)> = vec![
            // required_u32 is exactly u32.
            ("deepseek4.block_count", Value::U64(6)),
            ("deepseek4.attention.head_count", Value::I32(4)),
            // required_u64 takes u64|u32 only.
            (
                "deepseek4.rope.scaling.original_context_length",
                Value::I32(4096),
            ),
            // float-ish excludes u64 and strings.
            ("deepseek4.rope.freq_base", Value::U64(10000)),
            (
                "deepseek4.expert_weights_scale",
                Value::String("1.5".into()),
            ),
            // bool must be bool.
            ("deepseek4.expert_weights_norm", Value::U8(1)),
            (
                "deepseek4.attention.compress_ratios",
                Value::array(ValueType::U64, vec![Value::U64(0); 6]),
            ),
            ("deepseek4.swiglu_clamp_exp", arr_u32(&[1; 6])),
            ("tokenizer.ggml.tokens", arr_u32(&[1, 2, 3])),
        ];
        for (key, value) in cases {
            let mut w = hand_written();
            w.add_kv(key, value);
            let err = Config::from_gguf(&file(&w)).unwrap_err();
            assert!(
                matches!(err, ConfigError::Metadata(ds4_gguf::Error::KeyType { .. })),
                "{key}: {err}"
            );
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn missing_and_short_and_negative() {
        let mut w = GgufWriter::new();
        for (k, v) in hand_written_metadata()
            .into_iter()
            .filter(|(k, _)| k != "deepseek4.attention.sliding_window")
        {
            w.add_kv(&k, v);
        }
        let err = Config::from_gguf(&file(&w)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing metadata key \"deepseek4.attention.sliding_window\""
        );

        let mut w = hand_written();
        w.add_kv("deepseek4.attention.compress_ratios", arr_u32(&[0, 0, 4]));
        let err = Config::from_gguf(&file(&w)).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::ShortArray {
                    len: 3,
                    need: 6,
                    ..
                }
            ),
            "{err}"
        );

        let mut w = hand_written();
        let ratios = [0, 0, 4, -16, 4, 16]
            .iter()
            .map(|&x| Value::I32(x))
            .collect();
        w.add_kv(
            "deepseek4.attention.compress_ratios",
            Value::array(ValueType::I32, ratios),
        );
        let err = Config::from_gguf(&file(&w)).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Metadata(ds4_gguf::Error::NegativeItem { index: 3, .. })
            ),
            "{err}"
        );

        // Optional expert group keys count as 0 when absent, and must be 0 when present.
        let mut w = hand_written();
        w.add_kv("deepseek4.expert_group_count", Value::U32(2));
        let err = Config::from_gguf(&file(&w)).unwrap_err();
        assert!(err.to_string().contains("group-limited routing"), "{err}");
    }

    fn hand_written_metadata() -> Vec<(String, Value)> {
        let f = file(&hand_written());
        f.metadata().to_vec()
    }

    #[test]
    fn invariants_are_reported_together() {
        let mut w = hand_written();
        w.add_kv("deepseek4.attention.key_length", Value::U32(200)); // 200-64 not /64, != value_length
        w.add_kv("deepseek4.attention.output_group_count", Value::U32(3)); // 4 heads / 3
        w.add_kv("deepseek4.expert_used_count", Value::U32(17)); // > 16 experts
        w.add_kv("deepseek4.attention.sliding_window", Value::U32(16)); // ratio 32 > window
        w.add_kv("deepseek4.attention.indexer.key_length", Value::U32(64)); // CSA needs 128
        w.add_kv("deepseek4.hash_layer_count", Value::U32(7));
        let err = Config::from_gguf(&file(&w)).unwrap_err();
        let ConfigError::Invalid(problems) = &err else {
            panic!("{err}")
        };
        let all = problems.join("\n");
        for needle in [
            "value_length 192 != key_length 200",
            "not a multiple of 64",
            "not divisible by output_group_count 3",
            "expert_used_count 17 > expert_count 16",
            "layer 3: compress ratio 32 > sliding_window 16",
            "CSA layers need 128",
            "hash_layer_count 7 > block_count 6",
        ] {
            assert!(all.contains(needle), "{needle} not in:\n{all}");
        }
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn tokens_must_match_vocab() {
        let mut w = hand_written();
        w.add_kv("deepseek4.vocab_size", Value::U32(4));
        let err = Config::from_gguf(&file(&w)).unwrap_err();
        assert!(
            err.to_string()
                .contains("tokenizer.ggml.tokens has 3 entries, vocab_size is 4"),
            "{err}"
        );
    }

    #[test]
    fn tensor_dims_cross_checked() {
        let cfg = Config::tiny();
        let w = writer(&cfg, |_, tensors, _| {
            let t = tensors
                .iter_mut()
                .find(|t| t.name == "token_embd.weight")
                .unwrap();
            t.dims = vec![256, 500];
        });
        let err = Config::from_gguf(&file(&w)).unwrap_err();
        assert!(
            err.to_string()
                .contains("token_embd.weight dims [256, 500]"),
            "{err}"
        );
    }

    #[test]
    fn tiny_round_trip_and_flash_report() {
        let cfg = Config::from_gguf(&tiny_file()).unwrap();
        assert_eq!(
            cfg,
            Config {
                n_merges: 1,
                ..Config::tiny()
            }
        );
        assert_eq!(
            cfg.layer_kinds(),
            vec![
                LayerKind::Sliding,
                LayerKind::Sliding,
                LayerKind::Csa { ratio: 4 },
                LayerKind::Hca { ratio: 16 },
                LayerKind::Csa { ratio: 4 },
                LayerKind::Hca { ratio: 16 },
            ]
        );
        let shape = cfg.shape();
        shape.validate().unwrap();
        assert_eq!(shape.layer_kinds, cfg.layer_kinds());
        let diffs: Vec<String> = cfg
            .flash_mismatches()
            .iter()
            .map(|m| m.what.clone())
            .collect();
        for key in [
            "deepseek4.block_count",
            "deepseek4.embedding_length",
            "deepseek4.attention.compress_ratios",
            "deepseek4.swiglu_clamp_exp",
            "deepseek4.attention.indexer.top_k",
        ] {
            assert!(diffs.iter().any(|d| d == key), "{key} not in {diffs:?}");
        }
        assert!(
            !diffs
                .iter()
                .any(|d| d.ends_with("rope.freq_base") || d.ends_with("hyper_connection.count"))
        );
    }

    #[test]
    fn flash_constants() {
        let flash = Config::flash();
        assert!(flash.is_flash(), "{:?}", flash.flash_mismatches());
        assert!(
            flash.invariant_violations().is_empty(),
            "{:?}",
            flash.invariant_violations()
        );
        let r = flash_compress_ratios();
        assert_eq!(
            (r[0], r[1], r[2], r[3], r[41], r[42]),
            (0, 0, 4, 128, 128, 4)
        );
        assert_eq!(
            flash.layer_kinds().iter().filter(|k| k.is_csa()).count(),
            21
        );
        // Float tolerance of config_expect_f32: within max(1,|x|)·1e-6.
        let near = Config {
            compress_rope_base: 160_000.1,
            ..Config::flash()
        };
        assert!(near.is_flash());
        let off = Config {
            compress_rope_base: 160_001.0,
            ..Config::flash()
        };
        assert_eq!(off.flash_mismatches().len(), 1);
        assert_eq!(
            off.flash_mismatches()[0].to_string(),
            "deepseek4.attention.compress_rope_freq_base: 160001 (Flash: 160000)"
        );
        // Flash metadata survives a write/read.
        let mut w = GgufWriter::new();
        for (k, v) in flash.to_metadata() {
            w.add_kv(&k, v);
        }
        let f = file(&w);
        let back = Config::from_gguf(&f);
        // No tokenizer table: the one missing key is named.
        assert_eq!(
            back.unwrap_err().to_string(),
            "missing metadata key \"tokenizer.ggml.tokens\""
        );
    }
}
