//! The ds4 Flash GGUF tensor table (model.md §4.3) for a given config: GGUF name, dims,
//! the published storage class, and where each tensor comes from in the checkpoint.

use ds4_gguf::GgmlType;

use crate::OutType;
use crate::config::ModelConfig;

/// How a tensor is stored in the published GGUF files, which decides its type here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// F16 in every published file (embedding, HC, compressors, indexer, router).
    F16,
    /// F32 (norms, sinks, HC base/scale, router bias).
    F32,
    /// Q8_0 in the published files (attention projections, shared expert, output head).
    Q8,
    /// Routed expert gate or up projection.
    ExpertGateUp,
    /// Routed expert down projection.
    ExpertDown,
    /// `tid2eid`, I64 in the checkpoint, I32 in the GGUF.
    TokenToExpert,
}

impl Class {
    /// The GGUF type of a tensor of this class for the requested output type.
    pub fn ggml_type(self, out: OutType) -> GgmlType {
        match (self, out) {
            (Class::F16, _) => GgmlType::F16,
            (Class::F32, _) => GgmlType::F32,
            (Class::TokenToExpert, _) => GgmlType::I32,
            (Class::Q8 | Class::ExpertGateUp | Class::ExpertDown, OutType::F32) => GgmlType::F32,
            (Class::Q8 | Class::ExpertGateUp | Class::ExpertDown, OutType::F16) => GgmlType::F16,
            (Class::Q8, _) => GgmlType::Q8_0,
            (Class::ExpertGateUp | Class::ExpertDown, OutType::Q8_0) => GgmlType::Q8_0,
            // The published q2 file has IQ2_XXS gate/up; there is no IQ2_XXS quantizer yet,
            // so q2 writes Q2_K for them (and says so, see `crate::convert_hf`).
            (Class::ExpertGateUp | Class::ExpertDown, OutType::Q2) => GgmlType::Q2_K,
            (Class::ExpertGateUp | Class::ExpertDown, OutType::Q4) => GgmlType::Q4_K,
        }
    }
}

/// Where the data of a GGUF tensor comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// One checkpoint tensor: the first of these names that exists, of this (row-major,
    /// PyTorch order) shape.
    Tensor {
        candidates: Vec<String>,
        shape: Vec<usize>,
    },
    /// Routed experts `ffn.experts.{e}.{w}.weight`, e = 0..n_expert, each of `shape`,
    /// stacked along a new outermost axis.
    Experts {
        layer: u32,
        which: &'static str,
        n_expert: u32,
        shape: Vec<usize>,
    },
}

impl Source {
    /// The checkpoint names of expert `e` of a layer (official, then transformers' prefix).
    pub fn expert_candidates(layer: u32, which: &str, e: u32) -> Vec<String> {
        layer_names(layer, &[&format!("ffn.experts.{e}.{which}.weight")])
    }
}

/// One tensor of the output file.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    /// GGUF dims, ne0 (contiguous) first.
    pub dims: Vec<u64>,
    pub class: Class,
    pub source: Source,
    /// Written only when the checkpoint has it (the router bias).
    pub optional: bool,
}

impl PlannedTensor {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Checkpoint names of a global tensor: the official name first, then what
/// transformers' `save_pretrained` writes.
fn global_names(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Checkpoint names of a per-layer tensor: official `layers.L.x`, then `model.layers.L.x`.
fn layer_names(layer: u32, suffixes: &[&str]) -> Vec<String> {
    let mut out = Vec::with_capacity(2 * suffixes.len());
    for prefix in ["layers", "model.layers"] {
        for s in suffixes {
            out.push(format!("{prefix}.{layer}.{s}"));
        }
    }
    out
}

fn u(x: u32) -> usize {
    x as usize
}

/// The full tensor table for `cfg`, in file order: globals, then layer by layer.
pub fn plan(cfg: &ModelConfig) -> Vec<PlannedTensor> {
    let mut out = Vec::new();
    let n_embd = cfg.n_embd;
    let vocab = cfg.vocab_size;
    let hc = cfg.hc_mult;
    let hc_dim = hc * n_embd;
    let mix = cfg.hc_mix_width();

    let mut push = |name: String, dims: Vec<u32>, class: Class, source: Source, optional: bool| {
        out.push(PlannedTensor {
            name,
            dims: dims.into_iter().map(u64::from).collect(),
            class,
            source,
            optional,
        });
    };
    let tensor = |candidates: Vec<String>, shape: &[u32]| Source::Tensor {
        candidates,
        shape: shape.iter().map(|&d| u(d)).collect(),
    };

    push(
        "token_embd.weight".into(),
        vec![n_embd, vocab],
        Class::F16,
        tensor(
            global_names(&[
                "embed.weight",
                "model.embed_tokens.weight",
                "model.embed.weight",
            ]),
            &[vocab, n_embd],
        ),
        false,
    );
    push(
        "output_norm.weight".into(),
        vec![n_embd],
        Class::F32,
        tensor(
            global_names(&["norm.weight", "model.norm.weight"]),
            &[n_embd],
        ),
        false,
    );
    push(
        "output_hc_fn.weight".into(),
        vec![hc_dim, hc],
        Class::F16,
        tensor(
            global_names(&["hc_head_fn", "model.hc_head.hc_fn", "model.hc_head_fn"]),
            &[hc, hc_dim],
        ),
        false,
    );
    push(
        "output_hc_base.weight".into(),
        vec![hc],
        Class::F32,
        tensor(
            global_names(&[
                "hc_head_base",
                "model.hc_head.hc_base",
                "model.hc_head_base",
            ]),
            &[hc],
        ),
        false,
    );
    push(
        "output_hc_scale.weight".into(),
        vec![1],
        Class::F32,
        tensor(
            global_names(&[
                "hc_head_scale",
                "model.hc_head.hc_scale",
                "model.hc_head_scale",
            ]),
            &[1],
        ),
        false,
    );
    push(
        "output.weight".into(),
        vec![n_embd, vocab],
        Class::Q8,
        tensor(
            global_names(&["head.weight", "lm_head.weight", "model.head.weight"]),
            &[vocab, n_embd],
        ),
        false,
    );

    let q_dim = cfg.n_head * cfg.head_dim;
    let o_in = q_dim / cfg.o_groups;
    let o_low = cfg.o_groups * cfg.o_lora_rank;
    let ffn = cfg.expert_ffn;
    for il in 0..cfg.n_layer {
        let l = il as usize;
        let ratio = cfg.compress_ratios.get(l).copied().unwrap_or(0);
        let csa = cfg.is_csa.get(l).copied().unwrap_or(false);
        let blk = |s: &str| format!("blk.{il}.{s}");
        let names = |suffixes: &[&str]| layer_names(il, suffixes);

        for (kind, fn_, base, scale) in [
            ("attn", "hc_attn_fn", "hc_attn_base", "hc_attn_scale"),
            ("ffn", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale"),
        ] {
            push(
                blk(&format!("hc_{kind}_fn.weight")),
                vec![hc_dim, mix],
                Class::F16,
                tensor(names(&[fn_]), &[mix, hc_dim]),
                false,
            );
            push(
                blk(&format!("hc_{kind}_scale.weight")),
                vec![3],
                Class::F32,
                tensor(names(&[scale]), &[3]),
                false,
            );
            push(
                blk(&format!("hc_{kind}_base.weight")),
                vec![mix],
                Class::F32,
                tensor(names(&[base]), &[mix]),
                false,
            );
        }
        push(
            blk("attn_norm.weight"),
            vec![n_embd],
            Class::F32,
            tensor(names(&["attn_norm.weight"]), &[n_embd]),
            false,
        );
        push(
            blk("attn_q_a.weight"),
            vec![n_embd, cfg.q_lora_rank],
            Class::Q8,
            tensor(names(&["attn.wq_a.weight"]), &[cfg.q_lora_rank, n_embd]),
            false,
        );
        push(
            blk("attn_q_a_norm.weight"),
            vec![cfg.q_lora_rank],
            Class::F32,
            tensor(names(&["attn.q_norm.weight"]), &[cfg.q_lora_rank]),
            false,
        );
        push(
            blk("attn_q_b.weight"),
            vec![cfg.q_lora_rank, q_dim],
            Class::Q8,
            tensor(names(&["attn.wq_b.weight"]), &[q_dim, cfg.q_lora_rank]),
            false,
        );
        push(
            blk("attn_kv.weight"),
            vec![n_embd, cfg.head_dim],
            Class::Q8,
            tensor(names(&["attn.wkv.weight"]), &[cfg.head_dim, n_embd]),
            false,
        );
        push(
            blk("attn_kv_a_norm.weight"),
            vec![cfg.head_dim],
            Class::F32,
            // The official checkpoint calls the KV norm `attn.norm`.
            tensor(
                names(&["attn.norm.weight", "attn.kv_norm.weight"]),
                &[cfg.head_dim],
            ),
            false,
        );
        push(
            blk("attn_sinks.weight"),
            vec![cfg.n_head],
            Class::F32,
            tensor(names(&["attn.attn_sink"]), &[cfg.n_head]),
            false,
        );
        push(
            blk("attn_output_a.weight"),
            vec![o_in, o_low],
            Class::Q8,
            tensor(names(&["attn.wo_a.weight"]), &[o_low, o_in]),
            false,
        );
        push(
            blk("attn_output_b.weight"),
            vec![o_low, n_embd],
            Class::Q8,
            tensor(names(&["attn.wo_b.weight"]), &[n_embd, o_low]),
            false,
        );
        if ratio != 0 {
            let width = cfg.compressor_width(l);
            push(
                blk("attn_compressor_ape.weight"),
                vec![width, ratio],
                Class::F16,
                tensor(names(&["attn.compressor.ape"]), &[ratio, width]),
                false,
            );
            push(
                blk("attn_compressor_kv.weight"),
                vec![n_embd, width],
                Class::F16,
                tensor(names(&["attn.compressor.wkv.weight"]), &[width, n_embd]),
                false,
            );
            push(
                blk("attn_compressor_gate.weight"),
                vec![n_embd, width],
                Class::F16,
                tensor(names(&["attn.compressor.wgate.weight"]), &[width, n_embd]),
                false,
            );
            push(
                blk("attn_compressor_norm.weight"),
                vec![cfg.head_dim],
                Class::F32,
                tensor(names(&["attn.compressor.norm.weight"]), &[cfg.head_dim]),
                false,
            );
        }
        if csa {
            let ihd = cfg.index_head_dim;
            let iq = cfg.index_n_heads * ihd;
            push(
                blk("indexer.attn_q_b.weight"),
                vec![cfg.q_lora_rank, iq],
                Class::F16,
                tensor(names(&["attn.indexer.wq_b.weight"]), &[iq, cfg.q_lora_rank]),
                false,
            );
            push(
                blk("indexer.proj.weight"),
                vec![n_embd, cfg.index_n_heads],
                Class::F16,
                tensor(
                    names(&["attn.indexer.weights_proj.weight"]),
                    &[cfg.index_n_heads, n_embd],
                ),
                false,
            );
            push(
                blk("indexer_compressor_ape.weight"),
                vec![2 * ihd, ratio],
                Class::F16,
                tensor(names(&["attn.indexer.compressor.ape"]), &[ratio, 2 * ihd]),
                false,
            );
            push(
                blk("indexer_compressor_kv.weight"),
                vec![n_embd, 2 * ihd],
                Class::F16,
                tensor(
                    names(&["attn.indexer.compressor.wkv.weight"]),
                    &[2 * ihd, n_embd],
                ),
                false,
            );
            push(
                blk("indexer_compressor_gate.weight"),
                vec![n_embd, 2 * ihd],
                Class::F16,
                tensor(
                    names(&["attn.indexer.compressor.wgate.weight"]),
                    &[2 * ihd, n_embd],
                ),
                false,
            );
            push(
                blk("indexer_compressor_norm.weight"),
                vec![ihd],
                Class::F32,
                tensor(names(&["attn.indexer.compressor.norm.weight"]), &[ihd]),
                false,
            );
        }
        push(
            blk("ffn_norm.weight"),
            vec![n_embd],
            Class::F32,
            tensor(names(&["ffn_norm.weight"]), &[n_embd]),
            false,
        );
        push(
            blk("ffn_gate_inp.weight"),
            vec![n_embd, cfg.n_expert],
            Class::F16,
            tensor(names(&["ffn.gate.weight"]), &[cfg.n_expert, n_embd]),
            false,
        );
        if il < cfg.hash_layer_count {
            push(
                blk("ffn_gate_tid2eid.weight"),
                vec![cfg.n_expert_used, vocab],
                Class::TokenToExpert,
                tensor(names(&["ffn.gate.tid2eid"]), &[vocab, cfg.n_expert_used]),
                false,
            );
        } else {
            push(
                blk("exp_probs_b.bias"),
                vec![cfg.n_expert],
                Class::F32,
                tensor(names(&["ffn.gate.bias"]), &[cfg.n_expert]),
                true,
            );
        }
        for (gguf, which, class, dims, shape) in [
            (
                "ffn_gate_exps.weight",
                "w1",
                Class::ExpertGateUp,
                [n_embd, ffn],
                [ffn, n_embd],
            ),
            (
                "ffn_up_exps.weight",
                "w3",
                Class::ExpertGateUp,
                [n_embd, ffn],
                [ffn, n_embd],
            ),
            (
                "ffn_down_exps.weight",
                "w2",
                Class::ExpertDown,
                [ffn, n_embd],
                [n_embd, ffn],
            ),
        ] {
            push(
                blk(gguf),
                vec![dims[0], dims[1], cfg.n_expert],
                class,
                Source::Experts {
                    layer: il,
                    which,
                    n_expert: cfg.n_expert,
                    shape: vec![u(shape[0]), u(shape[1])],
                },
                false,
            );
        }
        for (gguf, which, dims, shape) in [
            ("ffn_gate_shexp.weight", "w1", [n_embd, ffn], [ffn, n_embd]),
            ("ffn_up_shexp.weight", "w3", [n_embd, ffn], [ffn, n_embd]),
            ("ffn_down_shexp.weight", "w2", [ffn, n_embd], [n_embd, ffn]),
        ] {
            push(
                blk(gguf),
                dims.to_vec(),
                Class::Q8,
                tensor(
                    names(&[&format!("ffn.shared_experts.{which}.weight")]),
                    &shape,
                ),
                false,
            );
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    /// The real Flash hyperparameters (model.md §2).
    fn flash() -> ModelConfig {
        let json = serde_json::json!({
            "num_hidden_layers": 43, "hidden_size": 4096, "vocab_size": 129280,
            "num_attention_heads": 64, "head_dim": 512, "qk_rope_head_dim": 64,
            "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
            "n_routed_experts": 256, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
            "sliding_window": 128, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
            "compress_ratios": (0..43).map(|i| if i < 2 { 0 } else if i % 2 == 0 { 4 } else { 128 }).collect::<Vec<_>>(),
            "num_hash_layers": 3,
            "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                             "beta_fast": 32, "beta_slow": 1}
        });
        ModelConfig::from_json(&json).unwrap()
    }

    #[test]
    fn flash_table_matches_the_spec_counts_and_shapes() {
        let p = plan(&flash());
        // model.md §4.3: 1328 = 6 global + 24 per SWA layer, 34 per CSA, 28 per HCA (each
        // counting tid2eid in hash layers and exp_probs_b in the others).
        assert_eq!(p.len(), 1328);
        assert_eq!(p.len(), 6 + 2 * 24 + 21 * 34 + 20 * 28);
        let get = |n: &str| p.iter().find(|t| t.name == n).unwrap();
        assert_eq!(get("token_embd.weight").dims, vec![4096, 129280]);
        assert_eq!(get("output_hc_fn.weight").dims, vec![16384, 4]);
        assert_eq!(get("blk.0.hc_attn_fn.weight").dims, vec![16384, 24]);
        assert_eq!(get("blk.0.attn_q_b.weight").dims, vec![1024, 32768]);
        assert_eq!(get("blk.0.attn_output_a.weight").dims, vec![4096, 8192]);
        assert_eq!(get("blk.0.attn_output_b.weight").dims, vec![8192, 4096]);
        assert_eq!(get("blk.2.attn_compressor_ape.weight").dims, vec![1024, 4]);
        assert_eq!(get("blk.3.attn_compressor_ape.weight").dims, vec![512, 128]);
        assert_eq!(get("blk.3.attn_compressor_kv.weight").dims, vec![4096, 512]);
        assert_eq!(get("blk.2.indexer.attn_q_b.weight").dims, vec![1024, 8192]);
        assert_eq!(get("blk.2.indexer.proj.weight").dims, vec![4096, 64]);
        assert_eq!(
            get("blk.2.indexer_compressor_ape.weight").dims,
            vec![256, 4]
        );
        assert_eq!(get("blk.2.ffn_gate_tid2eid.weight").dims, vec![6, 129280]);
        assert_eq!(
            get("blk.42.ffn_down_exps.weight").dims,
            vec![2048, 4096, 256]
        );
        assert_eq!(
            get("blk.42.ffn_gate_exps.weight").dims,
            vec![4096, 2048, 256]
        );
        assert!(p.iter().all(|t| t.name != "blk.3.indexer.proj.weight"));
        assert!(p.iter().all(|t| t.name != "blk.2.exp_probs_b.bias"));
        assert!(get("blk.3.exp_probs_b.bias").optional);
    }

    #[test]
    fn types_follow_the_published_files() {
        use GgmlType::*;
        let t = |c: Class, o| c.ggml_type(o);
        assert_eq!(t(Class::F16, OutType::F32), F16);
        assert_eq!(t(Class::F32, OutType::Q2), F32);
        assert_eq!(t(Class::Q8, OutType::F32), F32);
        assert_eq!(t(Class::Q8, OutType::F16), F16);
        assert_eq!(t(Class::Q8, OutType::Q4), Q8_0);
        assert_eq!(t(Class::ExpertGateUp, OutType::Q8_0), Q8_0);
        assert_eq!(t(Class::ExpertGateUp, OutType::Q2), Q2_K);
        assert_eq!(t(Class::ExpertDown, OutType::Q2), Q2_K);
        assert_eq!(t(Class::ExpertDown, OutType::Q4), Q4_K);
        assert_eq!(t(Class::TokenToExpert, OutType::Q4), I32);
    }
}
