//! Tensor-table validation (model.md §4.3/§4.4): every tensor the config implies, with
//! its dims and accepted types, plus missing and unexpected tensors, as a readable report.
//!
//! Accepted types per class: the published ds4 type, and also F32/F16/BF16 wherever a
//! quantised or F16 type is published (tiny test models are written in f32/f16). Routed
//! experts take IQ2_XXS, Q2_K, Q4_K or a float type (Q8_0 experts load but are flagged:
//! ds4 refuses them); gate and up must share one type. F32 tensors (norms, sinks, biases,
//! HC scale/base) must be F32.

use std::collections::HashSet;

use ds4_gguf::{GgmlType, GgufFile};

use crate::config::Config;

const FLOATS: &[GgmlType] = &[GgmlType::F32, GgmlType::F16, GgmlType::BF16];
const F32_ONLY: &[GgmlType] = &[GgmlType::F32];
const Q8_OR_FLOAT: &[GgmlType] = &[GgmlType::Q8_0, GgmlType::F32, GgmlType::F16, GgmlType::BF16];
const ROUTED: &[GgmlType] = &[
    GgmlType::IQ2_XXS,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
];
const I32_ONLY: &[GgmlType] = &[GgmlType::I32];

/// Storage class of a tensor, which fixes the types it may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorClass {
    /// Published F16: embedding, HC projections, compressors, indexer, router.
    F16,
    /// Published F32: norms, sinks, biases, HC scale and base.
    F32,
    /// Published Q8_0: attention projections, shared expert, lm_head.
    Q8,
    /// Routed gate/up experts.
    RoutedGateUp,
    /// Routed down experts.
    RoutedDown,
    /// The hash-routing table tid2eid.
    TokenToExpert,
}

impl TensorClass {
    /// The type ds4's published files use (first of several for routed experts).
    pub fn published(self) -> &'static [GgmlType] {
        match self {
            TensorClass::F16 => &[GgmlType::F16],
            TensorClass::F32 => F32_ONLY,
            TensorClass::Q8 => &[GgmlType::Q8_0],
            TensorClass::RoutedGateUp | TensorClass::RoutedDown => {
                &[GgmlType::IQ2_XXS, GgmlType::Q2_K, GgmlType::Q4_K]
            }
            TensorClass::TokenToExpert => I32_ONLY,
        }
    }

    /// Every type this engine accepts for the class.
    pub fn accepted(self) -> &'static [GgmlType] {
        match self {
            TensorClass::F16 => FLOATS,
            TensorClass::F32 => F32_ONLY,
            TensorClass::Q8 => Q8_OR_FLOAT,
            TensorClass::RoutedGateUp | TensorClass::RoutedDown => ROUTED,
            TensorClass::TokenToExpert => I32_ONLY,
        }
    }
}

/// One tensor the config implies.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedTensor {
    pub name: String,
    /// ggml order, ne0 first.
    pub dims: Vec<u64>,
    pub class: TensorClass,
    /// `exp_probs_b.bias` is optional (ds4 binds it when present).
    pub optional: bool,
}

/// How bad an issue is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Differs from ds4 but the engine can run it (extra tensors, Q8_0 experts).
    Warning,
    /// The engine cannot run this file.
    Error,
}

/// What is wrong with one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum IssueKind {
    Missing,
    Unexpected {
        why: String,
    },
    Dims {
        got: Vec<u64>,
        expected: Vec<u64>,
    },
    Type {
        got: GgmlType,
        accepted: Vec<GgmlType>,
    },
    GateUpMismatch {
        gate: GgmlType,
        up: GgmlType,
    },
    /// A per-file rule (e.g. block-size invariants, tid2eid contents).
    Rule(String),
}

/// One finding of [`validate_layout`].
#[derive(Debug, Clone, PartialEq)]
pub struct LayoutIssue {
    pub tensor: String,
    pub severity: Severity,
    pub kind: IssueKind,
}

impl std::fmt::Display for LayoutIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(f, "{level}: {}: ", self.tensor)?;
        match &self.kind {
            IssueKind::Missing => f.write_str("missing"),
            IssueKind::Unexpected { why } => write!(f, "unexpected tensor ({why})"),
            IssueKind::Dims { got, expected } => write!(f, "dims {got:?}, expected {expected:?}"),
            IssueKind::Type { got, accepted } => {
                let names: Vec<&str> = accepted.iter().map(|t| t.name()).collect();
                write!(f, "type {got}, accepted: {}", names.join(", "))
            }
            IssueKind::GateUpMismatch { gate, up } => {
                write!(
                    f,
                    "up type {up} differs from gate type {gate} (must be equal)"
                )
            }
            IssueKind::Rule(msg) => f.write_str(msg),
        }
    }
}

/// Every tensor the config implies, globals first, then layers in order.
pub fn expected_tensors(cfg: &Config) -> Vec<ExpectedTensor> {
    let u = |x: usize| x as u64;
    let mut out = Vec::new();
    let mut add = |name: String, dims: Vec<u64>, class: TensorClass| {
        let optional = name.ends_with("exp_probs_b.bias");
        out.push(ExpectedTensor {
            name,
            dims,
            class,
            optional,
        })
    };
    let (e, hc, mix) = (u(cfg.n_embd), u(cfg.hc_dim()), u(cfg.hc_mix()));
    add(
        "token_embd.weight".into(),
        vec![e, u(cfg.vocab)],
        TensorClass::F16,
    );
    add(
        "output.weight".into(),
        vec![e, u(cfg.vocab)],
        TensorClass::Q8,
    );
    add("output_norm.weight".into(), vec![e], TensorClass::F32);
    add(
        "output_hc_fn.weight".into(),
        vec![hc, u(cfg.hc_mult)],
        TensorClass::F16,
    );
    add(
        "output_hc_base.weight".into(),
        vec![u(cfg.hc_mult)],
        TensorClass::F32,
    );
    add("output_hc_scale.weight".into(), vec![1], TensorClass::F32);
    for il in 0..cfg.n_layer {
        let n = |x: &str| format!("blk.{il}.{x}");
        let kind = cfg
            .layer_kind(il)
            .unwrap_or(crate::shape::LayerKind::Sliding);
        add(n("hc_attn_fn.weight"), vec![hc, mix], TensorClass::F16);
        add(n("hc_attn_scale.weight"), vec![3], TensorClass::F32);
        add(n("hc_attn_base.weight"), vec![mix], TensorClass::F32);
        add(n("attn_norm.weight"), vec![e], TensorClass::F32);
        add(
            n("attn_q_a.weight"),
            vec![e, u(cfg.q_lora_rank)],
            TensorClass::Q8,
        );
        add(
            n("attn_q_a_norm.weight"),
            vec![u(cfg.q_lora_rank)],
            TensorClass::F32,
        );
        add(
            n("attn_q_b.weight"),
            vec![u(cfg.q_lora_rank), u(cfg.q_dim())],
            TensorClass::Q8,
        );
        add(
            n("attn_kv.weight"),
            vec![e, u(cfg.head_dim)],
            TensorClass::Q8,
        );
        add(
            n("attn_kv_a_norm.weight"),
            vec![u(cfg.head_dim)],
            TensorClass::F32,
        );
        add(
            n("attn_sinks.weight"),
            vec![u(cfg.n_head)],
            TensorClass::F32,
        );
        add(
            n("attn_output_a.weight"),
            vec![u(cfg.o_group_dim()), u(cfg.o_low_dim())],
            TensorClass::Q8,
        );
        add(
            n("attn_output_b.weight"),
            vec![u(cfg.o_low_dim()), e],
            TensorClass::Q8,
        );
        if kind.is_compressed() {
            let width = u(kind.coff() * cfg.head_dim);
            add(
                n("attn_compressor_ape.weight"),
                vec![width, u(kind.ratio())],
                TensorClass::F16,
            );
            add(
                n("attn_compressor_kv.weight"),
                vec![e, width],
                TensorClass::F16,
            );
            add(
                n("attn_compressor_gate.weight"),
                vec![e, width],
                TensorClass::F16,
            );
            add(
                n("attn_compressor_norm.weight"),
                vec![u(cfg.head_dim)],
                TensorClass::F32,
            );
        }
        if kind.is_csa() {
            let width = u(2 * cfg.indexer_dim);
            add(
                n("indexer.attn_q_b.weight"),
                vec![u(cfg.q_lora_rank), u(cfg.indexer_q_dim())],
                TensorClass::F16,
            );
            add(
                n("indexer.proj.weight"),
                vec![e, u(cfg.indexer_heads)],
                TensorClass::F16,
            );
            add(
                n("indexer_compressor_ape.weight"),
                vec![width, u(kind.ratio())],
                TensorClass::F16,
            );
            add(
                n("indexer_compressor_kv.weight"),
                vec![e, width],
                TensorClass::F16,
            );
            add(
                n("indexer_compressor_gate.weight"),
                vec![e, width],
                TensorClass::F16,
            );
            add(
                n("indexer_compressor_norm.weight"),
                vec![u(cfg.indexer_dim)],
                TensorClass::F32,
            );
        }
        add(n("hc_ffn_fn.weight"), vec![hc, mix], TensorClass::F16);
        add(n("hc_ffn_scale.weight"), vec![3], TensorClass::F32);
        add(n("hc_ffn_base.weight"), vec![mix], TensorClass::F32);
        add(n("ffn_norm.weight"), vec![e], TensorClass::F32);
        add(
            n("ffn_gate_inp.weight"),
            vec![e, u(cfg.n_expert)],
            TensorClass::F16,
        );
        if cfg.is_hash_layer(il) {
            add(
                n("ffn_gate_tid2eid.weight"),
                vec![u(cfg.n_expert_used), u(cfg.vocab)],
                TensorClass::TokenToExpert,
            );
        }
        let (ff, ne) = (u(cfg.ffn_width), u(cfg.n_expert));
        add(
            n("ffn_gate_exps.weight"),
            vec![e, ff, ne],
            TensorClass::RoutedGateUp,
        );
        add(
            n("ffn_up_exps.weight"),
            vec![e, ff, ne],
            TensorClass::RoutedGateUp,
        );
        add(
            n("ffn_down_exps.weight"),
            vec![ff, e, ne],
            TensorClass::RoutedDown,
        );
        add(n("ffn_gate_shexp.weight"), vec![e, ff], TensorClass::Q8);
        add(n("ffn_up_shexp.weight"), vec![e, ff], TensorClass::Q8);
        add(n("ffn_down_shexp.weight"), vec![ff, e], TensorClass::Q8);
        if !cfg.is_hash_layer(il) {
            add(n("exp_probs_b.bias"), vec![ne], TensorClass::F32);
        }
    }
    out
}

/// Trailing 1-dims do not change a tensor ([n] == [n, 1]).
fn trimmed(dims: &[u64]) -> &[u64] {
    let mut end = dims.len();
    while end > 1 && dims.get(end - 1) == Some(&1) {
        end -= 1;
    }
    dims.get(..end).unwrap_or(dims)
}

/// Checks the file's tensor table against the config. An empty result means the layout
/// is exactly what the engine needs.
pub fn validate_layout(file: &GgufFile, cfg: &Config) -> Vec<LayoutIssue> {
    let mut issues = Vec::new();
    let mut push = |tensor: &str, severity, kind| {
        issues.push(LayoutIssue {
            tensor: tensor.to_string(),
            severity,
            kind,
        })
    };
    // Every layer needs at least 24 tensors; a block_count far beyond the table is
    // reported once instead of enumerating millions of missing names.
    let min_needed = cfg.n_layer.saturating_mul(24).saturating_add(6);
    if min_needed > file.tensors().len().saturating_mul(2).saturating_add(64) {
        push(
            "(file)",
            Severity::Error,
            IssueKind::Rule(format!(
                "block_count {} needs at least {min_needed} tensors, the file has {}",
                cfg.n_layer,
                file.tensors().len()
            )),
        );
        return issues;
    }
    let expected = expected_tensors(cfg);
    let expected_names: HashSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
    for exp in &expected {
        let Some(info) = file.tensor(&exp.name) else {
            if !exp.optional {
                push(&exp.name, Severity::Error, IssueKind::Missing);
            }
            continue;
        };
        if trimmed(&info.dims) != trimmed(&exp.dims) {
            push(
                &exp.name,
                Severity::Error,
                IssueKind::Dims {
                    got: info.dims.clone(),
                    expected: exp.dims.clone(),
                },
            );
        }
        let ty = info.ggml_type;
        let routed = matches!(
            exp.class,
            TensorClass::RoutedGateUp | TensorClass::RoutedDown
        );
        if routed && ty == GgmlType::Q8_0 {
            push(
                &exp.name,
                Severity::Warning,
                IssueKind::Rule(
                    "Q8_0 routed experts are not accepted by ds4 (IQ2_XXS, Q2_K or Q4_K)".into(),
                ),
            );
        } else if !exp.class.accepted().contains(&ty) {
            push(
                &exp.name,
                Severity::Error,
                IssueKind::Type {
                    got: ty,
                    accepted: exp.class.accepted().to_vec(),
                },
            );
        }
        if routed && ty.block_elems() == 256 {
            // K-quant and IQ dots take Q8_K activations of the row input.
            let input = if exp.class == TensorClass::RoutedDown {
                cfg.ffn_width
            } else {
                cfg.n_embd
            };
            if !input.is_multiple_of(256) {
                push(
                    &exp.name,
                    Severity::Error,
                    IssueKind::Rule(format!(
                        "{ty} needs an input width that is a multiple of 256, got {input}"
                    )),
                );
            }
        }
        if exp.class == TensorClass::TokenToExpert && ty == GgmlType::I32 {
            let bad = file
                .tensor_data(info)
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .find(|&v| v < 0 || v as usize >= cfg.n_expert);
            if let Some(v) = bad {
                push(
                    &exp.name,
                    Severity::Error,
                    IssueKind::Rule(format!("expert id {v} out of range 0..{}", cfg.n_expert)),
                );
            }
        }
    }
    for il in 0..cfg.n_layer {
        let gate = file.tensor(&format!("blk.{il}.ffn_gate_exps.weight"));
        let up = file.tensor(&format!("blk.{il}.ffn_up_exps.weight"));
        if let (Some(g), Some(u)) = (gate, up)
            && g.ggml_type != u.ggml_type
        {
            push(
                &u.name,
                Severity::Error,
                IssueKind::GateUpMismatch {
                    gate: g.ggml_type,
                    up: u.ggml_type,
                },
            );
        }
    }
    for t in file.tensors() {
        if !expected_names.contains(t.name.as_str()) {
            let why = unexpected_reason(&t.name, cfg);
            push(&t.name, Severity::Warning, IssueKind::Unexpected { why });
        }
    }
    issues
}

/// Why a tensor is not part of the layout, naming the rule when it is a known per-layer
/// tensor in the wrong kind of layer.
fn unexpected_reason(name: &str, cfg: &Config) -> String {
    let Some((il, rest)) = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(il, rest)| Some((il.parse::<usize>().ok()?, rest)))
    else {
        return "not used by the engine; ignored".into();
    };
    let Some(kind) = cfg.layer_kind(il) else {
        return format!("layer {il} >= block_count {}", cfg.n_layer);
    };
    if rest.starts_with("indexer") {
        format!("indexer tensors belong to CSA layers; layer {il} is {kind:?}")
    } else if rest.starts_with("attn_compressor") {
        format!("compressor tensors belong to layers with ratio != 0; layer {il} is sliding")
    } else if rest.starts_with("ffn_gate_tid2eid") {
        format!(
            "tid2eid belongs to hash layers (< {}); ignored",
            cfg.n_hash_layers
        )
    } else if rest.starts_with("exp_probs_b") {
        format!("router bias in hash layer {il} is not used")
    } else {
        "not used by the engine; ignored".into()
    }
}

/// Totals for a report.
pub fn count_errors(issues: &[LayoutIssue]) -> usize {
    issues
        .iter()
        .filter(|i| i.severity == Severity::Error)
        .count()
}

/// Builders of complete in-memory model files for tests of this crate.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_files {
    use super::*;
    use ds4_gguf::{GgufWriter, Value, ValueType};

    /// Tensor bytes of `ty` for `dims`: zeros, except tid2eid rows with distinct ids.
    pub fn tensor_bytes(cfg: &Config, name: &str, dims: &[u64], ty: GgmlType) -> Vec<u8> {
        let rows: u64 = dims.iter().skip(1).product();
        let n = ty.row_bytes(dims[0]).unwrap() * rows;
        if name.ends_with("tid2eid.weight") && ty == GgmlType::I32 {
            let n_used = dims[0] as usize;
            return (0..rows as usize)
                .flat_map(|tok| (0..n_used).map(move |j| ((tok + j) % cfg.n_expert) as i32))
                .flat_map(i32::to_le_bytes)
                .collect();
        }
        vec![0; n as usize]
    }

    /// A writer holding `cfg`'s metadata, a token table and every expected tensor in its
    /// published type (IQ2_XXS gate/up, Q2_K down); `edit` may change anything after.
    pub fn writer(
        cfg: &Config,
        edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<ExpectedTensor>, &mut Vec<GgmlType>),
    ) -> GgufWriter {
        let mut meta = cfg.to_metadata();
        let tokens = (0..cfg.vocab)
            .map(|i| Value::String(format!("t{i}")))
            .collect();
        meta.push((
            "tokenizer.ggml.tokens".into(),
            Value::array(ValueType::String, tokens),
        ));
        meta.push((
            "tokenizer.ggml.merges".into(),
            Value::array(ValueType::String, vec![Value::String("t 1".into())]),
        ));
        let mut tensors = expected_tensors(cfg);
        let mut types: Vec<GgmlType> = tensors
            .iter()
            .map(|t| match t.class {
                TensorClass::RoutedGateUp => GgmlType::IQ2_XXS,
                TensorClass::RoutedDown => GgmlType::Q2_K,
                c => c.published()[0],
            })
            .collect();
        edit(&mut meta, &mut tensors, &mut types);
        let mut w = GgufWriter::new();
        for (k, v) in meta {
            w.add_kv(&k, v);
        }
        for (t, ty) in tensors.iter().zip(types) {
            w.add_tensor(
                &t.name,
                &t.dims,
                ty,
                tensor_bytes(cfg, &t.name, &t.dims, ty),
            )
            .unwrap();
        }
        w
    }

    pub fn file(w: &GgufWriter) -> GgufFile {
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        GgufFile::from_bytes(bytes).unwrap()
    }

    pub fn tiny_file() -> GgufFile {
        file(&writer(&Config::tiny(), |_, _, _| {}))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::test_files::*;
    use super::*;

    fn edit_file(
        edit: impl FnOnce(
            &mut Vec<(String, ds4_gguf::Value)>,
            &mut Vec<ExpectedTensor>,
            &mut Vec<GgmlType>,
        ),
    ) -> (Config, Vec<LayoutIssue>) {
        let cfg = Config::tiny();
        let f = file(&writer(&cfg, edit));
        let issues = validate_layout(&f, &cfg);
        (cfg, issues)
    }

    fn position(tensors: &[ExpectedTensor], name: &str) -> usize {
        tensors.iter().position(|t| t.name == name).unwrap()
    }

    #[test]
    fn flash_tensor_count_matches_spec() {
        // model.md §4.3: 1328 tensors (24 per SWA, 34 per CSA, 28 per HCA, 6 global),
        // exp_probs_b present in the 40 non-hash layers.
        let all = expected_tensors(&Config::flash());
        assert_eq!(all.len(), 1328);
        assert_eq!(all.iter().filter(|t| t.optional).count(), 40);
        let get = |n: &str| all.iter().find(|t| t.name == n).unwrap().dims.clone();
        // Dims straight from the §4.3 table.
        assert_eq!(get("output_hc_fn.weight"), vec![16384, 4]);
        assert_eq!(get("blk.0.hc_attn_fn.weight"), vec![16384, 24]);
        assert_eq!(get("blk.0.attn_q_b.weight"), vec![1024, 32768]);
        assert_eq!(get("blk.0.attn_output_a.weight"), vec![4096, 8192]);
        assert_eq!(get("blk.0.attn_output_b.weight"), vec![8192, 4096]);
        assert_eq!(get("blk.2.attn_compressor_ape.weight"), vec![1024, 4]);
        assert_eq!(get("blk.3.attn_compressor_ape.weight"), vec![512, 128]);
        assert_eq!(get("blk.3.attn_compressor_kv.weight"), vec![4096, 512]);
        assert_eq!(get("blk.42.indexer.attn_q_b.weight"), vec![1024, 8192]);
        assert_eq!(get("blk.42.indexer.proj.weight"), vec![4096, 64]);
        assert_eq!(get("blk.2.indexer_compressor_ape.weight"), vec![256, 4]);
        assert_eq!(get("blk.2.ffn_gate_tid2eid.weight"), vec![6, 129280]);
        assert_eq!(get("blk.5.ffn_down_exps.weight"), vec![2048, 4096, 256]);
        assert!(all.iter().all(|t| !t.name.starts_with("blk.3.indexer")));
        assert!(
            all.iter()
                .all(|t| t.name != "blk.3.ffn_gate_tid2eid.weight")
        );
        assert!(
            all.iter()
                .all(|t| t.name != "blk.1.attn_compressor_kv.weight")
        );
    }

    #[test]
    fn tiny_file_is_clean() {
        let f = tiny_file();
        let cfg = Config::from_gguf(&f).unwrap();
        let issues = validate_layout(&f, &cfg);
        assert!(issues.is_empty(), "{issues:#?}");
    }

    #[test]
    fn float_types_accepted_for_quantised_classes() {
        let (_, issues) = edit_file(|_, tensors, types| {
            for (t, ty) in tensors.iter().zip(types.iter_mut()) {
                if t.class != TensorClass::F32 && t.class != TensorClass::TokenToExpert {
                    *ty = GgmlType::F32;
                }
            }
        });
        assert!(issues.is_empty(), "{issues:#?}");
    }

    #[test]
    fn missing_and_optional() {
        let (_, issues) = edit_file(|_, tensors, types| {
            for name in ["blk.3.attn_sinks.weight", "blk.4.exp_probs_b.bias"] {
                let i = position(tensors, name);
                tensors.remove(i);
                types.remove(i);
            }
        });
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert_eq!(issues[0].tensor, "blk.3.attn_sinks.weight");
        assert_eq!(issues[0].kind, IssueKind::Missing);
        assert_eq!(
            issues[0].to_string(),
            "error: blk.3.attn_sinks.weight: missing"
        );
    }

    #[test]
    fn wrong_dims_and_types() {
        let (_, issues) = edit_file(|_, tensors, types| {
            let i = position(tensors, "blk.2.attn_compressor_ape.weight");
            tensors[i].dims = vec![256, 4]; // HCA width for a CSA layer
            let i = position(tensors, "blk.0.attn_norm.weight");
            types[i] = GgmlType::F16;
            let i = position(tensors, "blk.1.attn_q_a.weight");
            types[i] = GgmlType::Q4_K;
            let i = position(tensors, "blk.5.ffn_up_exps.weight");
            types[i] = GgmlType::Q4_K;
            let i = position(tensors, "blk.4.ffn_down_exps.weight");
            types[i] = GgmlType::Q8_0;
        });
        let find = |n: &str| issues.iter().filter(|i| i.tensor == n).collect::<Vec<_>>();
        assert!(matches!(
            find("blk.2.attn_compressor_ape.weight")[0].kind,
            IssueKind::Dims { .. }
        ));
        assert!(matches!(
            find("blk.0.attn_norm.weight")[0].kind,
            IssueKind::Type {
                got: GgmlType::F16,
                ..
            }
        ));
        assert!(matches!(
            find("blk.1.attn_q_a.weight")[0].kind,
            IssueKind::Type {
                got: GgmlType::Q4_K,
                ..
            }
        ));
        let up = find("blk.5.ffn_up_exps.weight");
        assert_eq!(up.len(), 1);
        assert_eq!(
            up[0].kind,
            IssueKind::GateUpMismatch {
                gate: GgmlType::IQ2_XXS,
                up: GgmlType::Q4_K
            }
        );
        let down = find("blk.4.ffn_down_exps.weight");
        assert_eq!(down[0].severity, Severity::Warning);
        assert_eq!(count_errors(&issues), 4, "{issues:#?}");
    }

    #[test]
    fn tensors_in_the_wrong_layer_kind() {
        let cfg = Config::tiny();
        let (_, issues) = edit_file(|_, tensors, types| {
            // Indexer on an HCA layer, compressor on a sliding layer, tid2eid past the
            // hash layers, router bias on a hash layer.
            for (name, dims, class) in [
                ("blk.3.indexer.proj.weight", vec![256, 4], TensorClass::F16),
                (
                    "blk.0.attn_compressor_kv.weight",
                    vec![256, 256],
                    TensorClass::F16,
                ),
                (
                    "blk.4.ffn_gate_tid2eid.weight",
                    vec![6, 512],
                    TensorClass::TokenToExpert,
                ),
                ("blk.1.exp_probs_b.bias", vec![16], TensorClass::F32),
                ("rope_freqs.weight", vec![32], TensorClass::F32),
            ] {
                types.push(class.published()[0]);
                tensors.push(ExpectedTensor {
                    name: name.into(),
                    dims,
                    class,
                    optional: false,
                });
            }
        });
        assert_eq!(issues.len(), 5, "{issues:#?}");
        assert!(issues.iter().all(|i| i.severity == Severity::Warning));
        let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
        assert!(text[0].contains("CSA layers"), "{text:?}");
        assert!(text[1].contains("ratio != 0"), "{text:?}");
        assert!(text[2].contains("hash layers (< 3)"), "{text:?}");
        assert!(text[3].contains("hash layer 1"), "{text:?}");
        let _ = cfg;
    }

    #[test]
    fn absurd_block_count_reported_once() {
        let cfg = Config {
            n_layer: 1_000_000,
            ..Config::tiny()
        };
        let issues = validate_layout(&tiny_file(), &cfg);
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert!(
            issues[0]
                .to_string()
                .contains("block_count 1000000 needs at least 24000006 tensors"),
            "{}",
            issues[0]
        );
    }

    #[test]
    fn tid2eid_ids_checked() {
        let cfg = Config::tiny();
        let mut w = writer(&cfg, |_, tensors, types| {
            let i = position(tensors, "blk.0.ffn_gate_tid2eid.weight");
            tensors.remove(i);
            types.remove(i);
        });
        let mut ids: Vec<u8> = Vec::new();
        for v in (0..6 * 512).map(|i: i32| if i == 77 { 16 } else { i % 16 }) {
            ids.extend_from_slice(&v.to_le_bytes());
        }
        w.add_tensor(
            "blk.0.ffn_gate_tid2eid.weight",
            &[6, 512],
            GgmlType::I32,
            ids,
        )
        .unwrap();
        let issues = validate_layout(&file(&w), &cfg);
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert!(
            issues[0]
                .to_string()
                .contains("expert id 16 out of range 0..16")
        );
    }

    #[test]
    fn narrow_model_with_q8_experts() {
        // n_embd 128 (tiny-b style) cannot hold IQ2_XXS gate/up rows; Q8_0 and float can.
        let cfg = Config {
            n_embd: 128,
            ..Config::tiny()
        };
        let all = expected_tensors(&cfg);
        let mut w = ds4_gguf::GgufWriter::new();
        for t in &all {
            let ty = if t.class == TensorClass::RoutedGateUp {
                GgmlType::Q8_0
            } else {
                t.class.accepted()[0]
            };
            let ty = if t.class == TensorClass::F16 || t.class == TensorClass::Q8 {
                GgmlType::F32
            } else {
                ty
            };
            w.add_tensor(
                &t.name,
                &t.dims,
                ty,
                tensor_bytes(&cfg, &t.name, &t.dims, ty),
            )
            .unwrap();
        }
        let issues = validate_layout(&file(&w), &cfg);
        // Q8_0 gate/up only warn (ds4 refuses them); IQ2_XXS down rows (ffn 256) are fine.
        assert!(
            issues.iter().all(|i| i.severity == Severity::Warning),
            "{issues:#?}"
        );
        assert!(
            issues
                .iter()
                .any(|i| i.tensor == "blk.0.ffn_gate_exps.weight")
        );
    }
}
