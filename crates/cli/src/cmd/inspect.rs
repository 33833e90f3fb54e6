//! `ds4 inspect FILE [--json]`: header, metadata, tensor table and totals of a GGUF file;
//! for deepseek4 files also the config and tensor-layout validation.
//!
//! Exit status: 0 when the file parses (and, for deepseek4 files, validates); 1 when the
//! file cannot be parsed (one-line reason on stderr); 2 when a deepseek4 file parses but
//! its config or tensor layout has errors (all listed in the report).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use ds4_gguf::{GgmlType, GgufFile, Value};
use ds4_model::config::{ARCH, Config, FlashMismatch};
use ds4_model::layout::{LayoutIssue, Severity, count_errors, validate_layout};
use serde_json::json;

/// Show what a GGUF file holds and whether it is a valid ds4 model.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF file.
    pub file: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Array items shown in summaries.
const SHOWN_ITEMS: usize = 8;

pub fn run(args: Args) -> anyhow::Result<()> {
    let file = match GgufFile::open(&args.file) {
        Ok(f) => f,
        Err(e) => {
            // A parse failure is the answer, not a crash: one line, non-zero status.
            eprintln!("ds4 inspect: {}: {e}", args.file.display());
            std::process::exit(1);
        }
    };
    let model = is_deepseek4(&file).then(|| validate(&file));
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&json_report(&args, &file, model.as_ref()))?;
        s.push('\n');
        s
    } else {
        text_report(&args, &file, model.as_ref())
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    if model.as_ref().is_some_and(ModelReport::has_errors) {
        std::process::exit(2);
    }
    Ok(())
}

fn is_deepseek4(file: &GgufFile) -> bool {
    file.get("general.architecture").and_then(Value::as_str) == Some(ARCH)
        || file
            .metadata()
            .iter()
            .any(|(k, _)| k.starts_with("deepseek4."))
}

struct ModelReport {
    config: Result<Config, String>,
    issues: Vec<LayoutIssue>,
    flash: Vec<FlashMismatch>,
}

impl ModelReport {
    fn has_errors(&self) -> bool {
        self.config.is_err() || count_errors(&self.issues) > 0
    }
}

fn validate(file: &GgufFile) -> ModelReport {
    match Config::from_gguf(file) {
        Ok(cfg) => ModelReport {
            issues: validate_layout(file, &cfg),
            flash: cfg.flash_mismatches(),
            config: Ok(cfg),
        },
        Err(e) => ModelReport {
            config: Err(e.to_string()),
            issues: Vec::new(),
            flash: Vec::new(),
        },
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// Bytes and tensor count per type, ordered by type id.
fn totals_by_type(file: &GgufFile) -> BTreeMap<u32, (GgmlType, usize, u64)> {
    let mut by: BTreeMap<u32, (GgmlType, usize, u64)> = BTreeMap::new();
    for t in file.tensors() {
        let e = by.entry(t.ggml_type.id()).or_insert((t.ggml_type, 0, 0));
        e.1 += 1;
        e.2 += t.n_bytes;
    }
    by
}

fn text_report(args: &Args, file: &GgufFile, model: Option<&ModelReport>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "file: {} ({} bytes, {})",
        args.file.display(),
        file.file_len(),
        human_bytes(file.file_len())
    );
    let _ = writeln!(
        s,
        "GGUF v{}, alignment {}, data offset {}, {} metadata keys, {} tensors",
        file.version(),
        file.alignment(),
        file.data_offset(),
        file.metadata().len(),
        file.tensors().len()
    );
    let _ = writeln!(s, "\nmetadata:");
    let key_width = file
        .metadata()
        .iter()
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(0);
    for (k, v) in file.metadata() {
        let _ = writeln!(s, "  {k:key_width$}  {:<14} {v}", v.type_description());
    }
    let _ = writeln!(s, "\ntensors:");
    let name_width = file
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0);
    for t in file.tensors() {
        let _ = writeln!(
            s,
            "  {:name_width$}  {:<8} {:<24} {:>14} B",
            t.name,
            t.ggml_type.name(),
            format!("{:?}", t.dims),
            t.n_bytes
        );
    }
    let total: u64 = file.tensors().iter().map(|t| t.n_bytes).sum();
    let elements: u64 = file.tensors().iter().map(|t| t.n_elements).sum();
    let _ = writeln!(
        s,
        "\ntotal: {} tensors, {elements} elements, {total} bytes ({})",
        file.tensors().len(),
        human_bytes(total)
    );
    for (ty, n, bytes) in totals_by_type(file).values() {
        let _ = writeln!(
            s,
            "  {:<8} {n:>6} tensors {:>12}",
            ty.name(),
            human_bytes(*bytes)
        );
    }
    if let Some(m) = model {
        let _ = writeln!(s, "\ndeepseek4 validation:");
        match &m.config {
            Err(e) => {
                let _ = writeln!(s, "  config: ERROR: {e}");
            }
            Ok(cfg) => {
                let kinds: Vec<String> = cfg
                    .layer_kinds()
                    .iter()
                    .map(|k| match k {
                        ds4_model::LayerKind::Sliding => "S".to_string(),
                        ds4_model::LayerKind::Csa { ratio } => format!("C{ratio}"),
                        ds4_model::LayerKind::Hca { ratio } => format!("H{ratio}"),
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "  config: ok: {} layers [{}], n_embd {}, vocab {}, {} heads x {}, {} experts ({} used), {} hash layers",
                    cfg.n_layer,
                    kinds.join(" "),
                    cfg.n_embd,
                    cfg.vocab,
                    cfg.n_head,
                    cfg.head_dim,
                    cfg.n_expert,
                    cfg.n_expert_used,
                    cfg.n_hash_layers
                );
                let errors = count_errors(&m.issues);
                let _ = writeln!(
                    s,
                    "  layout: {} ({errors} errors, {} warnings)",
                    if errors == 0 { "ok" } else { "ERRORS" },
                    m.issues.len() - errors
                );
                for issue in &m.issues {
                    let _ = writeln!(s, "    {issue}");
                }
                if m.flash.is_empty() {
                    let _ = writeln!(s, "  flash: all hyperparameters equal DeepSeek V4 Flash");
                } else {
                    let _ = writeln!(
                        s,
                        "  flash (info): {} differences from DeepSeek V4 Flash",
                        m.flash.len()
                    );
                    for d in &m.flash {
                        let _ = writeln!(s, "    {d}");
                    }
                }
            }
        }
    }
    s
}

fn json_value(v: &Value) -> serde_json::Value {
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Array { item_type, items } => json!({
            "item_type": item_type.name(),
            "len": items.len(),
            "first": items.iter().take(SHOWN_ITEMS).map(json_value).collect::<Vec<_>>(),
        }),
    }
}

fn json_report(args: &Args, file: &GgufFile, model: Option<&ModelReport>) -> serde_json::Value {
    let metadata: Vec<serde_json::Value> = file
        .metadata()
        .iter()
        .map(|(k, v)| json!({"key": k, "type": v.type_description(), "value": json_value(v)}))
        .collect();
    let tensors: Vec<serde_json::Value> = file
        .tensors()
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "type": t.ggml_type.name(),
                "shape": t.dims,
                "bytes": t.n_bytes,
                "offset": t.offset,
            })
        })
        .collect();
    let by_type: Vec<serde_json::Value> = totals_by_type(file)
        .values()
        .map(|(ty, n, bytes)| json!({"type": ty.name(), "tensors": n, "bytes": bytes}))
        .collect();
    let deepseek4 = model.map(|m| {
        let issue = |i: &LayoutIssue| {
            json!({
                "tensor": i.tensor,
                "severity": match i.severity { Severity::Error => "error", Severity::Warning => "warning" },
                "message": i.to_string(),
            })
        };
        json!({
            "ok": !m.has_errors(),
            "config_error": m.config.as_ref().err(),
            "config": m.config.as_ref().ok().map(|c| format!("{c:?}")),
            "layer_kinds": m.config.as_ref().ok().map(|c| c.layer_kinds().iter().map(|k| format!("{k:?}")).collect::<Vec<_>>()),
            "layout_issues": m.issues.iter().map(issue).collect::<Vec<_>>(),
            "flash_mismatches": m.flash.iter().map(|d| json!({"key": d.what, "got": d.got, "flash": d.expected})).collect::<Vec<_>>(),
        })
    });
    json!({
        "file": args.file.display().to_string(),
        "file_bytes": file.file_len(),
        "version": file.version(),
        "alignment": file.alignment(),
        "data_offset": file.data_offset(),
        "metadata": metadata,
        "tensors": tensors,
        "totals": {
            "tensors": file.tensors().len(),
            "bytes": file.tensors().iter().map(|t| t.n_bytes).sum::<u64>(),
            "elements": file.tensors().iter().map(|t| t.n_elements).sum::<u64>(),
            "by_type": by_type,
        },
        "deepseek4": deepseek4,
    })
}
