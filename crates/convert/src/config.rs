//! The model hyperparameters, read from a Hugging Face `config.json` of a DeepseekV4
//! checkpoint (as written by transformers ≥ 5.23, or the legacy keys of DeepSeek's own
//! config: `compress_ratios`, `num_hash_layers`, `rope_scaling`, `qk_rope_head_dim`).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

const SWA: &str = "sliding_attention";
const CSA: &str = "compressed_sparse_attention";
const HCA: &str = "heavily_compressed_attention";

/// Everything the GGUF metadata and the tensor shapes are derived from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub n_layer: u32,
    pub n_embd: u32,
    pub vocab_size: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub n_rot: u32,
    pub q_lora_rank: u32,
    pub o_groups: u32,
    pub o_lora_rank: u32,
    pub n_expert: u32,
    pub n_expert_used: u32,
    pub n_expert_shared: u32,
    pub expert_ffn: u32,
    pub hash_layer_count: u32,
    pub sliding_window: u32,
    pub index_n_heads: u32,
    pub index_head_dim: u32,
    pub index_topk: u32,
    pub hc_mult: u32,
    pub hc_sinkhorn_iters: u32,
    pub hc_eps: f32,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub compress_rope_theta: f32,
    pub yarn_factor: f32,
    pub yarn_original_ctx: u32,
    pub yarn_beta_fast: f32,
    pub yarn_beta_slow: f32,
    pub routed_scale: f32,
    pub norm_topk_prob: bool,
    pub swiglu_limit: f32,
    /// Per layer: 0 (sliding only), the CSA ratio or the HCA ratio.
    pub compress_ratios: Vec<u32>,
    /// Per layer: true for CSA (overlapping compressor + indexer).
    pub is_csa: Vec<bool>,
    pub context_length: u64,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&json)
    }

    pub fn from_json(json: &Value) -> Result<Self> {
        let obj = json
            .as_object()
            .ok_or_else(|| Error::bad_key("(root)", "is not a JSON object"))?;
        let c = Keys(obj);

        let n_layer = c.u32("num_hidden_layers")?;
        let head_dim = c.u32("head_dim")?;
        let n_rot = match obj.get("qk_rope_head_dim") {
            Some(_) => c.u32("qk_rope_head_dim")?,
            None => {
                let factor = c.f64_or("partial_rotary_factor", 64.0 / 512.0)?;
                let n = (f64::from(head_dim) * factor).round();
                if !(n >= 0.0 && n <= f64::from(head_dim)) {
                    return Err(Error::bad_key(
                        "partial_rotary_factor",
                        format!("gives {n} rotary dims for head_dim {head_dim}"),
                    ));
                }
                n as u32
            }
        };

        let (compress_ratios, is_csa) = layer_schedule(&c, n_layer)?;
        let hash_layer_count = hash_layers(&c, n_layer)?;
        let rope = RopeParams::read(&c)?;

        let scoring = c.str_or("scoring_func", "sqrtsoftplus")?;
        if scoring != "sqrtsoftplus" {
            return Err(Error::bad_key(
                "scoring_func",
                format!("is {scoring:?}; DeepSeek V4 Flash routes with \"sqrtsoftplus\""),
            ));
        }
        let n_head_kv = c.u32_or("num_key_value_heads", 1)?;
        if n_head_kv != 1 {
            return Err(Error::bad_key(
                "num_key_value_heads",
                format!("is {n_head_kv}; the model has one shared K=V head"),
            ));
        }
        let n_expert_shared = c.u32_or("n_shared_experts", 1)?;
        if n_expert_shared != 1 {
            return Err(Error::bad_key(
                "n_shared_experts",
                format!("is {n_expert_shared}; the GGUF layout has exactly one shared expert"),
            ));
        }

        let cfg = ModelConfig {
            n_layer,
            n_embd: c.u32("hidden_size")?,
            vocab_size: c.u32("vocab_size")?,
            n_head: c.u32("num_attention_heads")?,
            n_head_kv,
            head_dim,
            n_rot,
            q_lora_rank: c.u32("q_lora_rank")?,
            o_groups: c.u32("o_groups")?,
            o_lora_rank: c.u32("o_lora_rank")?,
            n_expert: c.u32("n_routed_experts")?,
            n_expert_used: c.u32("num_experts_per_tok")?,
            n_expert_shared,
            expert_ffn: c.u32("moe_intermediate_size")?,
            hash_layer_count,
            sliding_window: c.u32("sliding_window")?,
            index_n_heads: c.u32("index_n_heads")?,
            index_head_dim: c.u32("index_head_dim")?,
            index_topk: c.u32("index_topk")?,
            hc_mult: c.u32_or("hc_mult", 4)?,
            hc_sinkhorn_iters: c.u32_or("hc_sinkhorn_iters", 20)?,
            hc_eps: c.f64_or("hc_eps", 1e-6)? as f32,
            rms_eps: c.f64_or("rms_norm_eps", 1e-6)? as f32,
            rope_theta: rope.theta as f32,
            compress_rope_theta: rope.compress_theta as f32,
            yarn_factor: rope.factor as f32,
            yarn_original_ctx: rope.original_ctx,
            yarn_beta_fast: rope.beta_fast as f32,
            yarn_beta_slow: rope.beta_slow as f32,
            routed_scale: c.f64_or("routed_scaling_factor", 1.5)? as f32,
            norm_topk_prob: c.bool_or("norm_topk_prob", true)?,
            swiglu_limit: c.f64_or("swiglu_limit", 10.0)? as f32,
            compress_ratios,
            is_csa,
            context_length: c.u64_or("max_position_embeddings", 1 << 20)?,
            bos_token_id: c.opt_u32("bos_token_id")?,
            eos_token_id: c.opt_u32("eos_token_id")?,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Structural invariants the GGUF layout depends on (model.md §15).
    fn check(&self) -> Result<()> {
        let positive = [
            ("num_hidden_layers", self.n_layer),
            ("hidden_size", self.n_embd),
            ("vocab_size", self.vocab_size),
            ("num_attention_heads", self.n_head),
            ("head_dim", self.head_dim),
            ("q_lora_rank", self.q_lora_rank),
            ("o_groups", self.o_groups),
            ("o_lora_rank", self.o_lora_rank),
            ("n_routed_experts", self.n_expert),
            ("num_experts_per_tok", self.n_expert_used),
            ("moe_intermediate_size", self.expert_ffn),
            ("index_n_heads", self.index_n_heads),
            ("index_head_dim", self.index_head_dim),
            ("hc_mult", self.hc_mult),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(Error::bad_key(key, "must be positive"));
            }
        }
        if !self.n_head.is_multiple_of(self.o_groups) {
            return Err(Error::bad_key(
                "o_groups",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.o_groups, self.n_head
                ),
            ));
        }
        if self.n_expert_used > self.n_expert {
            return Err(Error::bad_key(
                "num_experts_per_tok",
                format!(
                    "{} exceeds n_routed_experts {}",
                    self.n_expert_used, self.n_expert
                ),
            ));
        }
        if self.n_rot > self.head_dim || !self.n_rot.is_multiple_of(2) {
            return Err(Error::bad_key(
                "qk_rope_head_dim",
                format!(
                    "{} rotary dims do not fit head_dim {}",
                    self.n_rot, self.head_dim
                ),
            ));
        }
        if self.hash_layer_count > self.n_layer {
            return Err(Error::bad_key(
                "mlp_layer_types",
                "more hash layers than layers",
            ));
        }
        Ok(())
    }

    /// Width of the attention compressor's projection: 2·head_dim for CSA (two
    /// overlapping series), head_dim for HCA.
    pub fn compressor_width(&self, layer: usize) -> u32 {
        if self.is_csa.get(layer).copied().unwrap_or(false) {
            2 * self.head_dim
        } else {
            self.head_dim
        }
    }

    pub fn hc_mix_width(&self) -> u32 {
        (2 + self.hc_mult) * self.hc_mult
    }
}

/// Per-layer compression ratios from `layer_types` + `compress_rates`, or the legacy
/// `compress_ratios` list. No default: the class default is the V4-Pro schedule, which is
/// wrong for Flash (model.md §3), so a config without either is refused.
fn layer_schedule(c: &Keys, n_layer: u32) -> Result<(Vec<u32>, Vec<bool>)> {
    let n = n_layer as usize;
    if let Some(types) = c.0.get("layer_types").filter(|v| !v.is_null()) {
        let types = types
            .as_array()
            .ok_or_else(|| Error::bad_key("layer_types", "is not a list"))?;
        if types.len() < n {
            return Err(Error::bad_key(
                "layer_types",
                format!("has {} entries for {n} layers", types.len()),
            ));
        }
        let rates = c.0.get("compress_rates").and_then(Value::as_object);
        let rate = |name: &str, legacy: &str, default: u32| -> Result<u32> {
            if let Some(v) = rates.and_then(|r| r.get(name)) {
                return as_u32(v).ok_or_else(|| {
                    Error::bad_key(&format!("compress_rates.{name}"), "is not a u32")
                });
            }
            c.u32_or(legacy, default)
        };
        let csa = rate(CSA, "compress_rate_csa", 4)?;
        let hca = rate(HCA, "compress_rate_hca", 128)?;
        let mut ratios = Vec::with_capacity(n);
        let mut is_csa = Vec::with_capacity(n);
        for (i, t) in types.iter().take(n).enumerate() {
            let (r, csa_layer) = match t.as_str() {
                Some(SWA) => (0, false),
                Some(CSA) => (csa, true),
                Some(HCA) => (hca, false),
                _ => {
                    return Err(Error::bad_key(
                        &format!("layer_types[{i}]"),
                        format!("is {t}; expected one of {SWA}, {CSA}, {HCA}"),
                    ));
                }
            };
            ratios.push(r);
            is_csa.push(csa_layer);
        }
        return Ok((ratios, is_csa));
    }
    if let Some(list) = c.0.get("compress_ratios").filter(|v| !v.is_null()) {
        let list = list
            .as_array()
            .ok_or_else(|| Error::bad_key("compress_ratios", "is not a list"))?;
        if list.len() < n {
            return Err(Error::bad_key(
                "compress_ratios",
                format!("has {} entries for {n} layers", list.len()),
            ));
        }
        let mut ratios = Vec::with_capacity(n);
        for (i, v) in list.iter().take(n).enumerate() {
            ratios.push(
                as_u32(v).ok_or_else(|| {
                    Error::bad_key(&format!("compress_ratios[{i}]"), "is not a u32")
                })?,
            );
        }
        // The legacy list only knows ratios; the overlapping (CSA) layers are the ratio-4 ones.
        let is_csa = ratios.iter().map(|&r| r == 4).collect();
        return Ok((ratios, is_csa));
    }
    Err(Error::MissingKey(
        "layer_types (or compress_ratios): the attention schedule must be explicit".into(),
    ))
}

/// Number of leading hash-routed layers; hash layers must come first.
fn hash_layers(c: &Keys, n_layer: u32) -> Result<u32> {
    if let Some(types) = c.0.get("mlp_layer_types").filter(|v| !v.is_null()) {
        let types = types
            .as_array()
            .ok_or_else(|| Error::bad_key("mlp_layer_types", "is not a list"))?;
        let mut count = 0u32;
        let mut seen_moe = false;
        for (i, t) in types.iter().take(n_layer as usize).enumerate() {
            match t.as_str() {
                Some("hash_moe") if !seen_moe => count += 1,
                Some("hash_moe") => {
                    return Err(Error::bad_key(
                        &format!("mlp_layer_types[{i}]"),
                        "hash_moe after a moe layer: hash layers must be the first layers",
                    ));
                }
                Some("moe") => seen_moe = true,
                _ => {
                    return Err(Error::bad_key(
                        &format!("mlp_layer_types[{i}]"),
                        format!("is {t}; expected hash_moe or moe"),
                    ));
                }
            }
        }
        return Ok(count);
    }
    c.u32_or("num_hash_layers", 3)
}

struct RopeParams {
    theta: f64,
    compress_theta: f64,
    factor: f64,
    original_ctx: u32,
    beta_fast: f64,
    beta_slow: f64,
}

impl RopeParams {
    /// transformers nests `{"main": {...}, "compress": {...}}` in `rope_parameters`; older
    /// configs have a flat `rope_parameters` or `rope_scaling` holding the YaRN values.
    fn read(c: &Keys) -> Result<Self> {
        let params =
            c.0.get("rope_parameters")
                .and_then(Value::as_object)
                .or_else(|| c.0.get("rope_scaling").and_then(Value::as_object));
        let main = params
            .and_then(|p| p.get("main"))
            .and_then(Value::as_object);
        let compress = params
            .and_then(|p| p.get("compress"))
            .and_then(Value::as_object)
            .or(params);
        let theta = match main.and_then(|m| m.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Error::bad_key("rope_parameters.main.rope_theta", "not a number"))?,
            None => c.f64_or("rope_theta", 10000.0)?,
        };
        let Some(compress) = compress else {
            return Err(Error::MissingKey(
                "rope_parameters (YaRN parameters of the compressed layers)".into(),
            ));
        };
        let ck = Keys(compress);
        let kind = match compress.get("rope_type").or_else(|| compress.get("type")) {
            Some(v) => v.as_str().unwrap_or("").to_string(),
            None => String::new(),
        };
        if kind != "yarn" {
            return Err(Error::bad_key(
                "rope_parameters",
                format!("compressed-layer RoPE type is {kind:?}; DeepSeek V4 Flash uses \"yarn\""),
            ));
        }
        let compress_theta = match compress.get("rope_theta") {
            Some(v) if main.is_some() => v.as_f64().ok_or_else(|| {
                Error::bad_key("rope_parameters.compress.rope_theta", "not a number")
            })?,
            _ => c.f64_or("compress_rope_theta", 160000.0)?,
        };
        Ok(RopeParams {
            theta,
            compress_theta,
            factor: ck
                .f64("factor")
                .map_err(|_| Error::MissingKey("rope_parameters.factor".into()))?,
            original_ctx: ck.u32("original_max_position_embeddings").map_err(|_| {
                Error::MissingKey("rope_parameters.original_max_position_embeddings".into())
            })?,
            beta_fast: ck.f64_or("beta_fast", 32.0)?,
            beta_slow: ck.f64_or("beta_slow", 1.0)?,
        })
    }
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok()).or_else(|| {
        // Integral floats (e.g. 65536.0) are accepted.
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= f64::from(u32::MAX))
            .map(|f| f as u32)
    })
}

/// Typed lookups in a JSON object with errors naming the key.
struct Keys<'a>(&'a Map<String, Value>);

impl Keys<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        match self.0.get(key) {
            Some(v) if !v.is_null() => Ok(v),
            _ => Err(Error::MissingKey(key.to_string())),
        }
    }

    fn u32(&self, key: &str) -> Result<u32> {
        as_u32(self.get(key)?)
            .ok_or_else(|| Error::bad_key(key, "is not a non-negative 32-bit integer"))
    }

    fn u32_or(&self, key: &str, default: u32) -> Result<u32> {
        match self.0.get(key) {
            Some(v) if !v.is_null() => self.u32(key),
            _ => Ok(default),
        }
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.0.get(key) {
            Some(Value::Array(list)) => Ok(list.first().and_then(as_u32)),
            Some(v) if !v.is_null() => self.u32(key).map(Some),
            _ => Ok(None),
        }
    }

    fn u64_or(&self, key: &str, default: u64) -> Result<u64> {
        match self.0.get(key) {
            Some(v) if !v.is_null() => v
                .as_u64()
                .ok_or_else(|| Error::bad_key(key, "is not a non-negative integer")),
            _ => Ok(default),
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.get(key)?
            .as_f64()
            .ok_or_else(|| Error::bad_key(key, "is not a number"))
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.0.get(key) {
            Some(v) if !v.is_null() => self.f64(key),
            _ => Ok(default),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.0.get(key) {
            Some(v) if !v.is_null() => v
                .as_bool()
                .ok_or_else(|| Error::bad_key(key, "is not a boolean")),
            _ => Ok(default),
        }
    }

    fn str_or<'s>(&'s self, key: &str, default: &'s str) -> Result<&'s str> {
        match self.0.get(key) {
            Some(v) if !v.is_null() => v
                .as_str()
                .ok_or_else(|| Error::bad_key(key, "is not a string")),
            _ => Ok(default),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flash_like() -> Value {
        json!({
            "num_hidden_layers": 4, "hidden_size": 256, "vocab_size": 512,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "partial_rotary_factor": 0.25, "q_lora_rank": 128, "o_groups": 2, "o_lora_rank": 128,
            "n_routed_experts": 8, "num_experts_per_tok": 6, "n_shared_experts": 1,
            "moe_intermediate_size": 256, "sliding_window": 16, "index_n_heads": 4,
            "index_head_dim": 128, "index_topk": 4, "swiglu_limit": 1.5,
            "layer_types": ["sliding_attention", "sliding_attention",
                            "compressed_sparse_attention", "heavily_compressed_attention"],
            "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
            "mlp_layer_types": ["hash_moe", "hash_moe", "hash_moe", "moe"],
            "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
            "rope_parameters": {
                "main": {"rope_type": "default", "rope_theta": 10000.0},
                "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16.0,
                             "original_max_position_embeddings": 65536,
                             "beta_fast": 32.0, "beta_slow": 1.0}
            },
            "max_position_embeddings": 1048576, "bos_token_id": 0, "eos_token_id": 1
        })
    }

    #[test]
    fn reads_transformers_config() {
        let c = ModelConfig::from_json(&flash_like()).unwrap();
        assert_eq!(c.compress_ratios, vec![0, 0, 4, 16]);
        assert_eq!(c.is_csa, vec![false, false, true, false]);
        assert_eq!(c.hash_layer_count, 3);
        assert_eq!(c.n_rot, 64);
        assert_eq!(c.yarn_original_ctx, 65536);
        assert_eq!(c.compress_rope_theta, 160000.0);
        assert_eq!(c.swiglu_limit, 1.5);
        assert_eq!(c.compressor_width(2), 512);
        assert_eq!(c.compressor_width(3), 256);
    }

    #[test]
    fn reads_legacy_keys() {
        let mut j = flash_like();
        let o = j.as_object_mut().unwrap();
        o.remove("layer_types");
        o.remove("compress_rates");
        o.remove("mlp_layer_types");
        o.remove("partial_rotary_factor");
        o.remove("rope_parameters");
        o.insert("compress_ratios".into(), json!([0, 0, 4, 128, 4]));
        o.insert("num_hash_layers".into(), json!(2));
        o.insert("qk_rope_head_dim".into(), json!(64));
        o.insert(
            "rope_scaling".into(),
            json!({"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                   "beta_fast": 32, "beta_slow": 1}),
        );
        let c = ModelConfig::from_json(&j).unwrap();
        assert_eq!(c.compress_ratios, vec![0, 0, 4, 128]);
        assert_eq!(c.is_csa, vec![false, false, true, false]);
        assert_eq!(c.hash_layer_count, 2);
        assert_eq!(c.yarn_factor, 16.0);
    }

    #[test]
    fn errors_name_the_key() {
        let mut j = flash_like();
        j.as_object_mut().unwrap().remove("q_lora_rank");
        let e = ModelConfig::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("q_lora_rank"), "{e}");

        let mut j = flash_like();
        j.as_object_mut().unwrap().remove("layer_types");
        let e = ModelConfig::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("layer_types"), "{e}");

        let mut j = flash_like();
        j["mlp_layer_types"] = json!(["moe", "hash_moe", "moe", "moe"]);
        let e = ModelConfig::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("mlp_layer_types[1]"), "{e}");

        let mut j = flash_like();
        j["layer_types"][1] = json!("full_attention");
        let e = ModelConfig::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("layer_types[1]"), "{e}");

        let mut j = flash_like();
        j["scoring_func"] = json!("softmax");
        assert!(ModelConfig::from_json(&j).is_err());
    }
}
