//! Files written by gguf-py (the reference implementation, `oracles/gen_gguf.py`,
//! `oracles/gen_tokenizer.py`): the reader must see exactly what gguf-py wrote and read
//! back, and our writer must reproduce gguf-py's bytes.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use ds4_gguf::{GgufFile, GgufWriter, Value};
use serde_json::Value as Json;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Our value against the JSON gguf-py's script recorded.
fn same(v: &Value, want: &Json) -> bool {
    match v {
        Value::U8(x) => want.as_u64() == Some(u64::from(*x)),
        Value::I8(x) => want.as_i64() == Some(i64::from(*x)),
        Value::U16(x) => want.as_u64() == Some(u64::from(*x)),
        Value::I16(x) => want.as_i64() == Some(i64::from(*x)),
        Value::U32(x) => want.as_u64() == Some(u64::from(*x)),
        Value::I32(x) => want.as_i64() == Some(i64::from(*x)),
        Value::U64(x) => want.as_u64() == Some(*x),
        Value::I64(x) => want.as_i64() == Some(*x),
        Value::F32(x) => want.as_f64() == Some(f64::from(*x)),
        Value::F64(x) => want.as_f64() == Some(*x),
        Value::Bool(x) => want.as_bool() == Some(*x),
        Value::String(x) => want.as_str() == Some(x.as_str()),
        Value::Array { items, .. } => want.as_array().is_some_and(|w| {
            w.len() == items.len() && items.iter().zip(w).all(|(a, b)| same(a, b))
        }),
    }
}

#[test]
fn reads_what_gguf_py_wrote() {
    let path = fixtures().join("gguf/gguf_py.gguf");
    let want: Json = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gguf/gguf_py.json")).unwrap(),
    )
    .unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.file_len(), want["file_bytes"].as_u64().unwrap());
    let kv = want["kv"].as_array().unwrap();
    assert_eq!(f.metadata().len(), kv.len());
    for ((key, value), w) in f.metadata().iter().zip(kv) {
        assert_eq!(key, w["key"].as_str().unwrap());
        let ty = w["type"].as_str().unwrap();
        let desc = value.type_description();
        assert_eq!(desc, ty, "{key}");
        assert!(
            same(value, &w["value"]),
            "{key}: {value:?} vs {}",
            w["value"]
        );
    }
    // Nested arrays keep their inner item type (gguf-py wrote INT32).
    let (_, outer) = f.get("t.arr_nested").unwrap().as_array().unwrap();
    assert_eq!(outer[0].type_description(), "array[i32]");
    assert_eq!(f.get_u64("t.u64").unwrap(), (1 << 63) + 5);
    assert_eq!(
        f.get_u32_array("t.arr_i32").unwrap_err().to_string(),
        "key \"t.arr_i32\": item 4 is -1, expected a non-negative value"
    );

    let tensors = want["tensors"].as_array().unwrap();
    assert_eq!(f.tensors().len(), tensors.len());
    for (t, w) in f.tensors().iter().zip(tensors) {
        assert_eq!(t.name, w["name"].as_str().unwrap());
        let dims: Vec<u64> = w["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.dims, dims, "{}", t.name);
        assert_eq!(t.ggml_type.name(), w["type"].as_str().unwrap());
        assert_eq!(t.offset, w["offset"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(t.n_bytes, w["n_bytes"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(
            fnv1a64(f.tensor_data(t)),
            w["fnv1a64"].as_str().unwrap(),
            "{}",
            t.name
        );
    }
}

#[test]
fn writer_reproduces_gguf_py_bytes() {
    let original = std::fs::read(fixtures().join("gguf/gguf_py.gguf")).unwrap();
    let f = GgufFile::from_bytes(original.clone()).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.add_kv(k, v.clone());
    }
    for t in f.tensors() {
        w.add_tensor(&t.name, &t.dims, t.ggml_type, f.tensor_data(t).to_vec())
            .unwrap();
    }
    let mut ours = Vec::new();
    w.write_to(&mut ours).unwrap();
    assert_eq!(ours.len(), original.len());
    assert!(
        ours == original,
        "first difference at byte {:?}",
        ours.iter().zip(&original).position(|(a, b)| a != b)
    );
}

#[test]
fn reads_the_full_v4_vocab_gguf() {
    // 129,280 tokens and 127,741 merges written by gguf-py (oracles/gen_tokenizer.py).
    let f = GgufFile::open(fixtures().join("vocab/deepseek-v4.gguf")).unwrap();
    let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 129_280);
    assert_eq!(tokens[0], "<｜begin▁of▁sentence｜>");
    assert_eq!(tokens[1], "<｜end▁of▁sentence｜>");
    assert_eq!(
        f.get_str_array("tokenizer.ggml.merges").unwrap().len(),
        127_741
    );
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "joyai-llm");
    assert!(f.tensors().is_empty());
}
