//! Test support: loads a tiny transformers checkpoint (fixtures/tiny-model/NAME/hf) into an
//! in-memory tensor table with the GGUF names and layouts of model.md §4.3, and reads the
//! oracle's tokens and logits.
//!
//! TEMPORARY: this stands in for `ds4 convert` until the converter lands; the conversion
//! is a plain rename/transpose-free relabel (torch [out, in] == ggml [in, out]) plus stacking
//! experts and narrowing tid2eid to I32.
#![allow(dead_code, clippy::unwrap_used, clippy::type_complexity)]

use std::collections::HashMap;
use std::path::PathBuf;

use ds4_gguf::GgmlType;
use ds4_model::shape::{LayerKind, ModelShape};
use ds4_model::weights::{TensorSource, TensorView};

pub struct Tensor {
    pub name: String,
    pub ty: GgmlType,
    pub dims: Vec<u64>,
    pub data: Vec<u8>,
}

#[derive(Default)]
pub struct MemTensors {
    pub map: HashMap<String, Tensor>,
}

impl TensorSource for MemTensors {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.map.get(name).map(|t| TensorView { name: &t.name, ty: t.ty, dims: &t.dims, data: &t.data })
    }
}

impl MemTensors {
    pub fn insert(&mut self, name: &str, ty: GgmlType, dims: Vec<u64>, data: Vec<u8>) {
        self.map.insert(name.to_string(), Tensor { name: name.to_string(), ty, dims, data });
    }
}

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-model").join(name)
}

fn gguf_name(hf: &str) -> Option<String> {
    let globals = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("head.weight", "output.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("model.hc_head.hc_fn", "output_hc_fn.weight"),
        ("model.hc_head.hc_base", "output_hc_base.weight"),
        ("model.hc_head.hc_scale", "output_hc_scale.weight"),
    ];
    if let Some((_, g)) = globals.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (il, rest) = rest.split_once('.')?;
    let local = match rest {
        "hc_attn_fn" | "hc_attn_base" | "hc_attn_scale" | "hc_ffn_fn" | "hc_ffn_base" | "hc_ffn_scale" => {
            format!("{rest}.weight")
        }
        "attn_norm.weight" => "attn_norm.weight".into(),
        "ffn_norm.weight" => "ffn_norm.weight".into(),
        "attn.wq_a.weight" => "attn_q_a.weight".into(),
        "attn.q_norm.weight" => "attn_q_a_norm.weight".into(),
        "attn.wq_b.weight" => "attn_q_b.weight".into(),
        "attn.wkv.weight" => "attn_kv.weight".into(),
        "attn.norm.weight" | "attn.kv_norm.weight" => "attn_kv_a_norm.weight".into(),
        "attn.attn_sink" => "attn_sinks.weight".into(),
        "attn.wo_a.weight" => "attn_output_a.weight".into(),
        "attn.wo_b.weight" => "attn_output_b.weight".into(),
        "attn.compressor.ape" => "attn_compressor_ape.weight".into(),
        "attn.compressor.wkv.weight" => "attn_compressor_kv.weight".into(),
        "attn.compressor.wgate.weight" => "attn_compressor_gate.weight".into(),
        "attn.compressor.norm.weight" => "attn_compressor_norm.weight".into(),
        "attn.indexer.wq_b.weight" => "indexer.attn_q_b.weight".into(),
        "attn.indexer.weights_proj.weight" => "indexer.proj.weight".into(),
        "attn.indexer.compressor.ape" => "indexer_compressor_ape.weight".into(),
        "attn.indexer.compressor.wkv.weight" => "indexer_compressor_kv.weight".into(),
        "attn.indexer.compressor.wgate.weight" => "indexer_compressor_gate.weight".into(),
        "attn.indexer.compressor.norm.weight" => "indexer_compressor_norm.weight".into(),
        "ffn.gate.weight" => "ffn_gate_inp.weight".into(),
        "ffn.gate.bias" | "ffn.gate.e_score_correction_bias" => "exp_probs_b.bias".into(),
        "ffn.gate.tid2eid" => "ffn_gate_tid2eid.weight".into(),
        "ffn.shared_experts.w1.weight" => "ffn_gate_shexp.weight".into(),
        "ffn.shared_experts.w3.weight" => "ffn_up_shexp.weight".into(),
        "ffn.shared_experts.w2.weight" => "ffn_down_shexp.weight".into(),
        _ => return None,
    };
    Some(format!("blk.{il}.{local}"))
}

/// Loads `fixtures/tiny-model/NAME/hf` as GGUF-named tensors (float types kept as stored).
pub fn load_hf(name: &str) -> (ModelShape, MemTensors) {
    let dir = fixture_dir(name).join("hf");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let shape = shape_from_hf(&cfg);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = MemTensors::default();
    // Experts: (layer, which) -> per-expert data.
    let mut experts: HashMap<(usize, &'static str), Vec<(usize, GgmlType, Vec<u64>, Vec<u8>)>> = HashMap::new();
    for (hf_name, view) in st.tensors() {
        let shape_t: Vec<u64> = view.shape().iter().rev().map(|&d| d as u64).collect();
        let (ty, data) = match view.dtype() {
            safetensors::Dtype::F32 => (GgmlType::F32, view.data().to_vec()),
            safetensors::Dtype::F16 => (GgmlType::F16, view.data().to_vec()),
            safetensors::Dtype::BF16 => (GgmlType::BF16, view.data().to_vec()),
            safetensors::Dtype::I64 => {
                let v: Vec<u8> = view
                    .data()
                    .chunks_exact(8)
                    .flat_map(|c| (i64::from_le_bytes(c.try_into().unwrap()) as i32).to_le_bytes())
                    .collect();
                (GgmlType::I32, v)
            }
            other => panic!("{hf_name}: dtype {other:?}"),
        };
        if let Some(rest) = hf_name.strip_prefix("model.layers.") {
            let (il, r) = rest.split_once('.').unwrap();
            if let Some(r) = r.strip_prefix("ffn.experts.") {
                let (e, w) = r.split_once('.').unwrap();
                let which = match w {
                    "w1.weight" => "ffn_gate_exps.weight",
                    "w3.weight" => "ffn_up_exps.weight",
                    "w2.weight" => "ffn_down_exps.weight",
                    _ => panic!("{hf_name}"),
                };
                experts.entry((il.parse().unwrap(), which)).or_default().push((e.parse().unwrap(), ty, shape_t, data));
                continue;
            }
        }
        let g = gguf_name(&hf_name).unwrap_or_else(|| panic!("unmapped tensor {hf_name}"));
        out.insert(&g, ty, shape_t, data);
    }
    for ((il, which), mut list) in experts {
        list.sort_by_key(|x| x.0);
        let (ty, dims) = (list[0].1, list[0].2.clone());
        let n = list.len() as u64;
        let data: Vec<u8> = list.into_iter().flat_map(|x| x.3).collect();
        out.insert(&format!("blk.{il}.{which}"), ty, vec![dims[0], dims[1], n], data);
    }
    (shape, out)
}

pub fn shape_from_hf(c: &serde_json::Value) -> ModelShape {
    let u = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("config {k}")) as usize;
    let f = |k: &str| c[k].as_f64().unwrap_or_else(|| panic!("config {k}")) as f32;
    let n_layer = u("num_hidden_layers");
    let rates = &c["compress_rates"];
    let layer_kinds = c["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| match t.as_str().unwrap() {
            "sliding_attention" => LayerKind::Sliding,
            "compressed_sparse_attention" => {
                LayerKind::Csa { ratio: rates["compressed_sparse_attention"].as_u64().unwrap() as usize }
            }
            "heavily_compressed_attention" => {
                LayerKind::Hca { ratio: rates["heavily_compressed_attention"].as_u64().unwrap() as usize }
            }
            other => panic!("layer type {other}"),
        })
        .collect();
    let n_hash = c["mlp_layer_types"].as_array().unwrap().iter().filter(|t| t.as_str() == Some("hash_moe")).count();
    let yarn = &c["rope_parameters"]["compress"];
    let head_dim = u("head_dim");
    ModelShape {
        n_layer,
        n_embd: u("hidden_size"),
        vocab: u("vocab_size"),
        n_head: u("num_attention_heads"),
        head_dim,
        n_rot: (head_dim as f64 * c["partial_rotary_factor"].as_f64().unwrap()).round() as usize,
        q_lora_rank: u("q_lora_rank"),
        o_groups: u("o_groups"),
        o_lora_rank: u("o_lora_rank"),
        n_expert: u("n_routed_experts"),
        n_expert_used: u("num_experts_per_tok"),
        n_ff_exp: u("moe_intermediate_size"),
        n_hash_layers: n_hash,
        sliding_window: u("sliding_window"),
        layer_kinds,
        indexer_heads: u("index_n_heads"),
        indexer_dim: u("index_head_dim"),
        indexer_top_k: u("index_topk"),
        hc_mult: u("hc_mult"),
        hc_sinkhorn_iters: u("hc_sinkhorn_iters"),
        hc_eps: f("hc_eps"),
        rms_eps: f("rms_norm_eps"),
        rope_base: f("rope_theta"),
        compress_rope_base: f("compress_rope_theta"),
        yarn_factor: yarn["factor"].as_f64().unwrap() as f32,
        yarn_orig_ctx: yarn["original_max_position_embeddings"].as_f64().unwrap() as f32,
        yarn_beta_fast: yarn["beta_fast"].as_f64().unwrap() as f32,
        yarn_beta_slow: yarn["beta_slow"].as_f64().unwrap() as f32,
        expert_weights_scale: f("routed_scaling_factor"),
        expert_weights_norm: c["norm_topk_prob"].as_bool().unwrap(),
        swiglu_clamp: vec![f("swiglu_limit"); n_layer],
    }
}

pub fn load_seq(name: &str, seq: &str) -> (Vec<u32>, Vec<f32>) {
    let dir = fixture_dir(name);
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{seq}.tokens.json"))).unwrap()).unwrap();
    let tokens: Vec<u32> = t["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let raw = std::fs::read(dir.join(format!("{seq}.logits.f32"))).unwrap();
    let logits = raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (tokens, logits)
}

/// max over positions of max|a−b| / max|ref| (per position), and the worst position.
pub fn max_rel_err(got: &[f32], want: &[f32], vocab: usize) -> (f32, usize) {
    let mut worst = (0.0f32, 0usize);
    for (p, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
        let d = g.iter().zip(w).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        if d / scale > worst.0 {
            worst = (d / scale, p);
        }
    }
    worst
}
