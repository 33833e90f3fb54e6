//! Converts the tiny transformers checkpoints of `fixtures/tiny-model` (made by
//! `oracles/tiny_model.py`) and checks the GGUF against the checkpoint itself: every
//! tensor round-trips (exactly for f32/f16, within the format's error for quantized
//! types), names/dims/types follow model.md §4.3, and every metadata value equals what
//! config.json and tokenizer.json say. The expectations are derived here from the
//! checkpoint files, independently of the converter's own tables.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ds4_convert::{ConvertOptions, OutType, convert_hf, convert_hf_to_bytes};
use ds4_gguf::{GgmlType, GgufFile, Value};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/tiny-model")
        .join(name)
        .join("hf")
}

fn temp_out(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ds4-convert-{}-{tag}.gguf", std::process::id()))
}

/// The checkpoint's tensors as f32 (floats) or i64 (ints), by name.
struct Source {
    floats: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    ints: BTreeMap<String, (Vec<usize>, Vec<i64>)>,
    config: Json,
    tokenizer: Json,
}

fn load_source(dir: &Path) -> Source {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut floats = BTreeMap::new();
    let mut ints = BTreeMap::new();
    for (name, view) in st.iter() {
        let d = view.data();
        let shape = view.shape().to_vec();
        match view.dtype() {
            Dtype::F32 => {
                let v = d
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()));
                floats.insert(name.to_string(), (shape, v.collect()));
            }
            Dtype::F16 => {
                let v = d
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32());
                floats.insert(name.to_string(), (shape, v.collect()));
            }
            Dtype::BF16 => {
                let v = d
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32());
                floats.insert(name.to_string(), (shape, v.collect()));
            }
            Dtype::I64 => {
                let v = d
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()));
                ints.insert(name.to_string(), (shape, v.collect()));
            }
            other => panic!("unexpected dtype {other:?} for {name}"),
        }
    }
    let read_json = |f: &str| -> Json {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };
    Source {
        floats,
        ints,
        config: read_json("config.json"),
        tokenizer: read_json("tokenizer.json"),
    }
}

/// Published storage class of a GGUF tensor (model.md §4.3), from its name alone.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Class {
    F16,
    F32,
    Q8,
    Routed,
    I32,
}

fn class_of(gguf: &str) -> Class {
    let base = gguf.rsplit_once("blk.").map_or(gguf, |(_, rest)| {
        rest.split_once('.').map_or(rest, |(_, r)| r)
    });
    match base {
        "token_embd.weight"
        | "output_hc_fn.weight"
        | "hc_attn_fn.weight"
        | "hc_ffn_fn.weight"
        | "ffn_gate_inp.weight" => Class::F16,
        b if b.starts_with("attn_compressor_") && b != "attn_compressor_norm.weight" => Class::F16,
        b if b.starts_with("indexer") && !b.ends_with("norm.weight") => Class::F16,
        "output.weight"
        | "attn_q_a.weight"
        | "attn_q_b.weight"
        | "attn_kv.weight"
        | "attn_output_a.weight"
        | "attn_output_b.weight"
        | "ffn_gate_shexp.weight"
        | "ffn_up_shexp.weight"
        | "ffn_down_shexp.weight" => Class::Q8,
        "ffn_gate_exps.weight" | "ffn_up_exps.weight" | "ffn_down_exps.weight" => Class::Routed,
        "ffn_gate_tid2eid.weight" => Class::I32,
        _ => Class::F32,
    }
}

fn expected_type(gguf: &str, out: OutType) -> GgmlType {
    match (class_of(gguf), out) {
        (Class::F16, _) => GgmlType::F16,
        (Class::F32, _) => GgmlType::F32,
        (Class::I32, _) => GgmlType::I32,
        (Class::Q8 | Class::Routed, OutType::F32) => GgmlType::F32,
        (Class::Q8 | Class::Routed, OutType::F16) => GgmlType::F16,
        (Class::Q8, _) | (Class::Routed, OutType::Q8_0) => GgmlType::Q8_0,
        (Class::Routed, OutType::Q2) => GgmlType::Q2_K,
        (Class::Routed, OutType::Q4) => GgmlType::Q4_K,
    }
}

/// GGUF name → checkpoint name(s) as `save_pretrained` wrote them (official suffixes).
fn source_names(gguf: &str, n_expert: usize) -> Vec<String> {
    let global = |s: &str| vec![s.to_string()];
    match gguf {
        "token_embd.weight" => return global("model.embed_tokens.weight"),
        "output.weight" => return global("head.weight"),
        "output_norm.weight" => return global("model.norm.weight"),
        "output_hc_fn.weight" => return global("model.hc_head.hc_fn"),
        "output_hc_base.weight" => return global("model.hc_head.hc_base"),
        "output_hc_scale.weight" => return global("model.hc_head.hc_scale"),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.").expect("layer tensor");
    let (layer, base) = rest.split_once('.').unwrap();
    let p = format!("model.layers.{layer}.");
    let experts = |w: &str| {
        (0..n_expert)
            .map(|e| format!("{p}ffn.experts.{e}.{w}.weight"))
            .collect::<Vec<_>>()
    };
    let official = match base {
        "hc_attn_fn.weight" => "hc_attn_fn",
        "hc_attn_scale.weight" => "hc_attn_scale",
        "hc_attn_base.weight" => "hc_attn_base",
        "hc_ffn_fn.weight" => "hc_ffn_fn",
        "hc_ffn_scale.weight" => "hc_ffn_scale",
        "hc_ffn_base.weight" => "hc_ffn_base",
        "attn_norm.weight" => "attn_norm.weight",
        "attn_q_a.weight" => "attn.wq_a.weight",
        "attn_q_a_norm.weight" => "attn.q_norm.weight",
        "attn_q_b.weight" => "attn.wq_b.weight",
        "attn_kv.weight" => "attn.wkv.weight",
        "attn_kv_a_norm.weight" => "attn.norm.weight",
        "attn_sinks.weight" => "attn.attn_sink",
        "attn_output_a.weight" => "attn.wo_a.weight",
        "attn_output_b.weight" => "attn.wo_b.weight",
        "attn_compressor_ape.weight" => "attn.compressor.ape",
        "attn_compressor_kv.weight" => "attn.compressor.wkv.weight",
        "attn_compressor_gate.weight" => "attn.compressor.wgate.weight",
        "attn_compressor_norm.weight" => "attn.compressor.norm.weight",
        "indexer.attn_q_b.weight" => "attn.indexer.wq_b.weight",
        "indexer.proj.weight" => "attn.indexer.weights_proj.weight",
        "indexer_compressor_ape.weight" => "attn.indexer.compressor.ape",
        "indexer_compressor_kv.weight" => "attn.indexer.compressor.wkv.weight",
        "indexer_compressor_gate.weight" => "attn.indexer.compressor.wgate.weight",
        "indexer_compressor_norm.weight" => "attn.indexer.compressor.norm.weight",
        "ffn_norm.weight" => "ffn_norm.weight",
        "ffn_gate_inp.weight" => "ffn.gate.weight",
        "exp_probs_b.bias" => "ffn.gate.bias",
        "ffn_gate_tid2eid.weight" => "ffn.gate.tid2eid",
        "ffn_gate_shexp.weight" => "ffn.shared_experts.w1.weight",
        "ffn_up_shexp.weight" => "ffn.shared_experts.w3.weight",
        "ffn_down_shexp.weight" => "ffn.shared_experts.w2.weight",
        "ffn_gate_exps.weight" => return experts("w1"),
        "ffn_up_exps.weight" => return experts("w3"),
        "ffn_down_exps.weight" => return experts("w2"),
        other => panic!("unexpected GGUF tensor {other} in layer {layer}"),
    };
    vec![format!("{p}{official}")]
}

fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    ds4_quant::dequantize_row(ty, bytes, &mut out).unwrap();
    out
}

/// Checks a quantized tensor against its source, block by block, with the error bound of
/// the format (relative to each block's largest magnitude), and returns the relative RMS
/// error of the whole tensor.
fn check_quantized(name: &str, ty: GgmlType, got: &[f32], want: &[f32]) -> f64 {
    let block = ty.block_elems() as usize;
    // Q8_0: |err| ≤ d/2 with d = amax/127 (plus the f16 rounding of d). K-quants: scales
    // and mins are themselves quantized; the bound is half a step of the 4-bit (Q4_K) or
    // 2-bit (Q2_K) grid over the block's range, with slack for the 6/4-bit scales.
    let bound = match ty {
        GgmlType::Q8_0 => 0.6 / 127.0,
        GgmlType::Q4_K => 2.0 / 15.0,
        GgmlType::Q2_K => 2.0 / 3.0,
        other => panic!("no bound for {other:?}"),
    };
    let (mut err2, mut ref2) = (0f64, 0f64);
    for (b, (g, w)) in got.chunks(block).zip(want.chunks(block)).enumerate() {
        let range = match ty {
            GgmlType::Q8_0 => w.iter().fold(0f32, |m, v| m.max(v.abs())),
            _ => {
                let max = w.iter().fold(f32::MIN, |m, &v| m.max(v));
                let min = w.iter().fold(f32::MAX, |m, &v| m.min(v));
                max - min.min(0.0)
            }
        };
        for (i, (x, y)) in g.iter().zip(w).enumerate() {
            let e = (x - y).abs();
            assert!(
                e <= bound * range + 1e-6,
                "{name} ({ty:?}) block {b} elem {i}: got {x}, want {y}, range {range}"
            );
            err2 += f64::from(e) * f64::from(e);
            ref2 += f64::from(*y) * f64::from(*y);
        }
    }
    (err2 / ref2.max(1e-30)).sqrt()
}

fn u32_of(v: &Json) -> u32 {
    u32::try_from(v.as_u64().unwrap()).unwrap()
}

fn expected_compress_ratios(cfg: &Json) -> Vec<u32> {
    let rates = &cfg["compress_rates"];
    cfg["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| match t.as_str().unwrap() {
            "sliding_attention" => 0,
            other => u32_of(&rates[other]),
        })
        .collect()
}

/// Every tensor the GGUF must contain, with dims, derived from the checkpoint's own
/// tensor shapes (PyTorch [out, in] becomes GGUF [in, out]; experts get a third axis).
fn expected_tensors(src: &Source) -> BTreeMap<String, Vec<u64>> {
    let cfg = &src.config;
    let n_layer = u32_of(&cfg["num_hidden_layers"]) as usize;
    let n_expert = u32_of(&cfg["n_routed_experts"]) as usize;
    let n_hash = cfg["mlp_layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| *t == "hash_moe")
        .count();
    let ratios = expected_compress_ratios(cfg);
    let mut names: Vec<String> = [
        "token_embd.weight",
        "output.weight",
        "output_norm.weight",
        "output_hc_fn.weight",
        "output_hc_base.weight",
        "output_hc_scale.weight",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for il in 0..n_layer {
        let mut layer = vec![
            "hc_attn_fn.weight",
            "hc_attn_scale.weight",
            "hc_attn_base.weight",
            "attn_norm.weight",
            "attn_q_a.weight",
            "attn_q_a_norm.weight",
            "attn_q_b.weight",
            "attn_kv.weight",
            "attn_kv_a_norm.weight",
            "attn_sinks.weight",
            "attn_output_a.weight",
            "attn_output_b.weight",
            "hc_ffn_fn.weight",
            "hc_ffn_scale.weight",
            "hc_ffn_base.weight",
            "ffn_norm.weight",
            "ffn_gate_inp.weight",
            "ffn_gate_exps.weight",
            "ffn_up_exps.weight",
            "ffn_down_exps.weight",
            "ffn_gate_shexp.weight",
            "ffn_up_shexp.weight",
            "ffn_down_shexp.weight",
        ];
        if ratios[il] != 0 {
            layer.extend([
                "attn_compressor_ape.weight",
                "attn_compressor_kv.weight",
                "attn_compressor_gate.weight",
                "attn_compressor_norm.weight",
            ]);
        }
        if cfg["layer_types"][il] == "compressed_sparse_attention" {
            layer.extend([
                "indexer.attn_q_b.weight",
                "indexer.proj.weight",
                "indexer_compressor_ape.weight",
                "indexer_compressor_kv.weight",
                "indexer_compressor_gate.weight",
                "indexer_compressor_norm.weight",
            ]);
        }
        if il < n_hash {
            layer.push("ffn_gate_tid2eid.weight");
        } else {
            layer.push("exp_probs_b.bias");
        }
        names.extend(layer.iter().map(|s| format!("blk.{il}.{s}")));
    }
    names
        .into_iter()
        .map(|name| {
            let sources = source_names(&name, n_expert);
            let shape: Vec<u64> = src
                .floats
                .get(&sources[0])
                .map(|(s, _)| s.clone())
                .or_else(|| src.ints.get(&sources[0]).map(|(s, _)| s.clone()))
                .unwrap_or_else(|| panic!("{name}: {} not in checkpoint", sources[0]))
                .iter()
                .rev()
                .map(|&d| d as u64)
                .collect();
            let mut dims = shape;
            if sources.len() > 1 {
                dims.push(sources.len() as u64);
            }
            (name, dims)
        })
        .collect()
}

fn check_metadata(file: &GgufFile, src: &Source) {
    let cfg = &src.config;
    let u32_key = |k: &str| match file.get(k) {
        Some(Value::U32(v)) => *v,
        other => panic!("{k}: expected u32, got {other:?}"),
    };
    let f32_key = |k: &str| match file.get(k) {
        Some(Value::F32(v)) => f64::from(*v),
        other => panic!("{k}: expected f32, got {other:?}"),
    };
    let close = |k: &str, want: f64| {
        let got = f32_key(k);
        assert!(
            (got - want).abs() <= want.abs().max(1.0) * 1e-6,
            "{k}: {got} vs {want}"
        );
    };
    let c = |k: &str| u32_of(&cfg[k]);
    let arch = "deepseek4";
    for (key, want) in [
        ("block_count", c("num_hidden_layers")),
        ("embedding_length", c("hidden_size")),
        ("vocab_size", c("vocab_size")),
        ("attention.head_count", c("num_attention_heads")),
        ("attention.head_count_kv", c("num_key_value_heads")),
        ("attention.key_length", c("head_dim")),
        ("attention.value_length", c("head_dim")),
        ("rope.dimension_count", c("qk_rope_head_dim")),
        ("attention.q_lora_rank", c("q_lora_rank")),
        ("attention.output_lora_rank", c("o_lora_rank")),
        ("attention.output_group_count", c("o_groups")),
        ("expert_count", c("n_routed_experts")),
        ("expert_used_count", c("num_experts_per_tok")),
        ("expert_feed_forward_length", c("moe_intermediate_size")),
        ("expert_shared_count", c("n_shared_experts")),
        ("attention.sliding_window", c("sliding_window")),
        ("attention.indexer.head_count", c("index_n_heads")),
        ("attention.indexer.key_length", c("index_head_dim")),
        ("attention.indexer.top_k", c("index_topk")),
        ("hyper_connection.count", c("hc_mult")),
        (
            "hyper_connection.sinkhorn_iterations",
            c("hc_sinkhorn_iters"),
        ),
        (
            "hash_layer_count",
            cfg["mlp_layer_types"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| *t == "hash_moe")
                .count() as u32,
        ),
        (
            "rope.scaling.original_context_length",
            u32_of(&cfg["rope_parameters"]["compress"]["original_max_position_embeddings"]),
        ),
    ] {
        assert_eq!(u32_key(&format!("{arch}.{key}")), want, "{arch}.{key}");
    }
    let yarn = &cfg["rope_parameters"]["compress"];
    for (key, want) in [
        (
            "rope.freq_base",
            cfg["rope_parameters"]["main"]["rope_theta"].as_f64(),
        ),
        (
            "attention.compress_rope_freq_base",
            yarn["rope_theta"].as_f64(),
        ),
        ("rope.scaling.factor", yarn["factor"].as_f64()),
        ("rope.scaling.yarn_beta_fast", yarn["beta_fast"].as_f64()),
        ("rope.scaling.yarn_beta_slow", yarn["beta_slow"].as_f64()),
        (
            "expert_weights_scale",
            cfg["routed_scaling_factor"].as_f64(),
        ),
        (
            "attention.layer_norm_rms_epsilon",
            cfg["rms_norm_eps"].as_f64(),
        ),
        ("hyper_connection.epsilon", cfg["hc_eps"].as_f64()),
    ] {
        close(&format!("{arch}.{key}"), want.unwrap());
    }
    assert_eq!(
        file.get("deepseek4.expert_weights_norm"),
        Some(&Value::Bool(cfg["norm_topk_prob"].as_bool().unwrap()))
    );
    assert_eq!(
        file.get("deepseek4.context_length"),
        Some(&Value::U64(
            cfg["max_position_embeddings"].as_u64().unwrap()
        ))
    );
    let n_layer = c("num_hidden_layers") as usize;
    match file.get("deepseek4.attention.compress_ratios") {
        Some(Value::Array { items, .. }) => {
            let got: Vec<u32> = items
                .iter()
                .map(|v| match v {
                    Value::U32(x) => *x,
                    other => panic!("compress_ratios item {other:?}"),
                })
                .collect();
            assert_eq!(got, expected_compress_ratios(cfg));
        }
        other => panic!("compress_ratios: {other:?}"),
    }
    match file.get("deepseek4.swiglu_clamp_exp") {
        Some(Value::Array { items, .. }) => {
            assert_eq!(items.len(), n_layer);
            let limit = cfg["swiglu_limit"].as_f64().unwrap() as f32;
            assert!(items.iter().all(|v| *v == Value::F32(limit)), "{items:?}");
        }
        other => panic!("swiglu_clamp_exp: {other:?}"),
    }
    assert_eq!(file.get_str("general.architecture").unwrap(), "deepseek4");
    assert_eq!(file.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), "joyai-llm");

    // Tokenizer: every id of tokenizer.json (vocab + added tokens) at its index, merges in
    // rank order, BOS/EOS ids.
    let tokens = file.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), c("vocab_size") as usize);
    let tok = &src.tokenizer;
    for (content, id) in tok["model"]["vocab"].as_object().unwrap() {
        assert_eq!(tokens[id.as_u64().unwrap() as usize], *content);
    }
    for a in tok["added_tokens"].as_array().unwrap() {
        assert_eq!(
            tokens[a["id"].as_u64().unwrap() as usize],
            a["content"].as_str().unwrap()
        );
    }
    let merges = file.get_str_array("tokenizer.ggml.merges").unwrap();
    let want_merges: Vec<String> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Json::String(s) => s.clone(),
            Json::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            other => panic!("merge {other}"),
        })
        .collect();
    assert_eq!(merges, want_merges);
    assert_eq!(u32_key("tokenizer.ggml.bos_token_id"), c("bos_token_id"));
    assert_eq!(u32_key("tokenizer.ggml.eos_token_id"), c("eos_token_id"));
    assert_eq!(tokens[0], "<｜begin▁of▁sentence｜>");
    assert_eq!(tokens[1], "<｜end▁of▁sentence｜>");
    for required in [
        "<｜User｜>",
        "<｜Assistant｜>",
        "<think>",
        "</think>",
        "｜DSML｜",
    ] {
        assert!(tokens.contains(&required), "{required}");
    }
}

/// Converts `fixture` to `out_type` and checks everything; returns the worst relative RMS
/// error per quantized type.
fn convert_and_check(fixture_name: &str, out_type: OutType) -> BTreeMap<String, f64> {
    let dir = fixture(fixture_name);
    let src = load_source(&dir);
    let out = temp_out(&format!("{fixture_name}-{}", out_type.name()));
    let report = convert_hf(
        &dir,
        &out,
        &ConvertOptions {
            out_type,
            name: Some(fixture_name.to_string()),
        },
    )
    .unwrap();
    let file = GgufFile::open(&out).unwrap();
    std::fs::remove_file(&out).unwrap();

    check_metadata(&file, &src);
    assert_eq!(file.get_str("general.name").unwrap(), fixture_name);

    // The engine's own reading of the file: config accepted, layout without any issue.
    let cfg = ds4_model::config::Config::from_gguf(&file)
        .unwrap_or_else(|e| panic!("{fixture_name} {out_type}: Config::from_gguf: {e}"));
    let issues = ds4_model::layout::validate_layout(&file, &cfg);
    assert_eq!(ds4_model::layout::count_errors(&issues), 0, "{issues:?}");
    if out_type == OutType::Q8_0 {
        // Q8_0 routed experts are a float-free test format, not a published one: the
        // checker warns about exactly those tensors and nothing else.
        assert!(
            issues.iter().all(|i| i.tensor.ends_with("_exps.weight")),
            "{fixture_name} {out_type}: layout issues {issues:?}"
        );
    } else {
        assert!(
            issues.is_empty(),
            "{fixture_name} {out_type}: layout issues {issues:?}"
        );
    }

    let expected = expected_tensors(&src);
    let got: BTreeMap<String, &ds4_gguf::TensorInfo> =
        file.tensors().iter().map(|t| (t.name.clone(), t)).collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    assert_eq!(report.tensors, expected.len());
    let n_expert = u32_of(&src.config["n_routed_experts"]) as usize;
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    for (name, dims) in &expected {
        let info = got[name];
        assert_eq!(&info.dims, dims, "{name} dims");
        let ty = expected_type(name, out_type);
        assert_eq!(info.ggml_type, ty, "{name} type");
        let data = file.tensor_data(info);
        let sources = source_names(name, n_expert);
        if ty == GgmlType::I32 {
            let (_, want) = &src.ints[&sources[0]];
            let got: Vec<i64> = data
                .chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes(b.try_into().unwrap())))
                .collect();
            assert_eq!(&got, want, "{name}");
            continue;
        }
        let want: Vec<f32> = sources
            .iter()
            .flat_map(|s| src.floats[s].1.iter().copied())
            .collect();
        let got = dequantize(ty, data, want.len());
        match ty {
            // The fixtures' weights are f16-representable: float outputs are exact copies.
            GgmlType::F32 | GgmlType::F16 => {
                let mismatch = got.iter().zip(&want).position(|(a, b)| a != b);
                assert_eq!(mismatch, None, "{name}: first differing element");
            }
            _ => {
                let rel = check_quantized(name, ty, &got, &want);
                let e = worst.entry(ty.name().to_string()).or_insert(0.0);
                *e = e.max(rel);
            }
        }
    }
    worst
}

#[test]
fn tiny_a_round_trips_in_every_type() {
    for t in OutType::ALL {
        let worst = convert_and_check("tiny-a", t);
        eprintln!("tiny-a {t}: worst relative RMS error per type {worst:?}");
        if let Some(q8) = worst.get("Q8_0") {
            assert!(*q8 < 0.01, "Q8_0 relative RMS error {q8}");
        }
        if let Some(q4) = worst.get("Q4_K") {
            assert!(*q4 < 0.1, "Q4_K relative RMS error {q4}");
        }
        if let Some(q2) = worst.get("Q2_K") {
            assert!(*q2 < 0.45, "Q2_K relative RMS error {q2}");
        }
    }
}

#[test]
fn tiny_b_round_trips_in_float_and_q8() {
    for t in [OutType::F32, OutType::F16, OutType::Q8_0] {
        convert_and_check("tiny-b", t);
    }
}

#[test]
fn tiny_b_refuses_k_quants_cleanly() {
    // tiny-b's rows (n_embd 128, FFN 64) are not whole 256-element blocks.
    for t in [OutType::Q2, OutType::Q4] {
        let out = temp_out(&format!("tiny-b-refused-{}", t.name()));
        let err = convert_hf(
            &fixture("tiny-b"),
            &out,
            &ConvertOptions {
                out_type: t,
                name: None,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("_exps.weight"), "{err}");
        assert!(err.contains("256-element blocks"), "{err}");
        assert!(!out.exists(), "no output may be left behind");
    }
}

#[test]
fn q2_says_it_substitutes_q2_k_for_iq2_xxs() {
    let out = temp_out("tiny-a-q2-note");
    let report = convert_hf(
        &fixture("tiny-a"),
        &out,
        &ConvertOptions {
            out_type: OutType::Q2,
            name: None,
        },
    )
    .unwrap();
    std::fs::remove_file(&out).unwrap();
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("Q2_K") && n.contains("IQ2_XXS")),
        "{:?}",
        report.notes
    );
}

#[test]
fn in_memory_conversion_equals_the_file() {
    let dir = fixture("tiny-b");
    let opts = ConvertOptions {
        out_type: OutType::Q8_0,
        name: Some("x".into()),
    };
    let out = temp_out("tiny-b-bytes");
    convert_hf(&dir, &out, &opts).unwrap();
    let on_disk = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    let (bytes, report) = convert_hf_to_bytes(&dir, &opts).unwrap();
    assert_eq!(report.output, None);
    assert!(bytes == on_disk, "in-memory and file conversions differ");
    GgufFile::from_bytes(bytes).unwrap();
}

#[test]
fn missing_tensor_is_named_and_nothing_is_written() {
    // A copy of tiny-b without one tensor.
    let src = fixture("tiny-b");
    let dir = std::env::temp_dir().join(format!("ds4-convert-{}-broken", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dropped = "model.layers.3.attn.wo_b.weight";
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != dropped)
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).unwrap();
    let out = dir.join("out.gguf");
    let err = convert_hf(&dir, &out, &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("blk.3.attn_output_b.weight"), "{err}");
    assert!(err.contains(dropped), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
