//! The `tokenizer.ggml.*` metadata, from a Hugging Face byte-level BPE `tokenizer.json`.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";

/// llama.cpp token types.
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;

#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    /// Token strings, index = id.
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// "left right", rank = index.
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
    /// Ids the tokenizer does not define, filled with `[PAD{id}]` up to the model's vocab.
    pub padded: usize,
}

impl Vocab {
    pub fn from_file(path: &Path, vocab_size: u32) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&json, vocab_size)
    }

    pub fn from_json(json: &Value, vocab_size: u32) -> Result<Self> {
        let bad = |m: &str| Error::Tokenizer(m.to_string());
        let model = json.get("model").ok_or_else(|| bad("no `model` section"))?;
        if let Some(kind) = model.get("type").and_then(Value::as_str)
            && kind != "BPE"
        {
            return Err(Error::Tokenizer(format!(
                "model type is {kind:?}; only byte-level BPE is supported"
            )));
        }
        let n = vocab_size as usize;
        let mut tokens: Vec<Option<String>> = vec![None; n];
        let mut types = vec![TOKEN_NORMAL; n];
        let mut place = |id: &Value, content: String, ty: i32| -> Result<()> {
            let id = id
                .as_u64()
                .ok_or_else(|| Error::Tokenizer(format!("token {content:?} has a bad id {id}")))?;
            let slot = tokens.get_mut(id as usize).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "token {content:?} has id {id}, beyond the model's vocab_size {vocab_size}"
                ))
            })?;
            *slot = Some(content);
            if let Some(t) = types.get_mut(id as usize) {
                *t = ty;
            }
            Ok(())
        };
        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no `model.vocab` object"))?;
        for (content, id) in vocab {
            place(id, content.clone(), TOKEN_NORMAL)?;
        }
        if let Some(added) = json.get("added_tokens").and_then(Value::as_array) {
            for a in added {
                let content = a
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("an added token has no content"))?;
                let special = a.get("special").and_then(Value::as_bool).unwrap_or(false);
                let ty = if special {
                    TOKEN_CONTROL
                } else {
                    TOKEN_USER_DEFINED
                };
                place(a.get("id").unwrap_or(&Value::Null), content.to_string(), ty)?;
            }
        }
        let mut padded = 0;
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(id, t)| {
                t.unwrap_or_else(|| {
                    padded += 1;
                    if let Some(ty) = types.get_mut(id) {
                        *ty = TOKEN_UNUSED;
                    }
                    format!("[PAD{id}]")
                })
            })
            .collect();

        let merges_json = model
            .get("merges")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no `model.merges` list"))?;
        let mut merges = Vec::with_capacity(merges_json.len());
        for (i, m) in merges_json.iter().enumerate() {
            let pair = match m {
                Value::String(s) => s.clone(),
                Value::Array(parts) => match parts.as_slice() {
                    [Value::String(a), Value::String(b)] => {
                        if a.contains(' ') || b.contains(' ') {
                            return Err(Error::Tokenizer(format!(
                                "merge {i} ({a:?}, {b:?}) contains a space, which GGUF merges cannot represent"
                            )));
                        }
                        format!("{a} {b}")
                    }
                    _ => return Err(Error::Tokenizer(format!("merge {i} is not a pair"))),
                },
                _ => {
                    return Err(Error::Tokenizer(format!(
                        "merge {i} is neither string nor pair"
                    )));
                }
            };
            merges.push(pair);
        }

        let find = |s: &str| {
            tokens
                .iter()
                .position(|t| t == s)
                .and_then(|i| u32::try_from(i).ok())
        };
        let bos = find(BOS).ok_or_else(|| Error::Tokenizer(format!("no BOS token {BOS:?}")))?;
        let eos = find(EOS).ok_or_else(|| Error::Tokenizer(format!("no EOS token {EOS:?}")))?;
        Ok(Vocab {
            tokens,
            token_types: types,
            merges,
            bos,
            eos,
            padded,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "added_tokens": [
                {"id": 0, "content": BOS, "special": true},
                {"id": 1, "content": EOS, "special": true},
                {"id": 5, "content": "<think>", "special": false}
            ],
            "model": {"type": "BPE", "vocab": {"a": 2, "b": 3, "ab": 4},
                      "merges": ["a b"]}
        })
    }

    #[test]
    fn builds_tokens_types_and_merges() {
        let v = Vocab::from_json(&sample(), 7).unwrap();
        assert_eq!(
            v.tokens,
            vec![BOS, EOS, "a", "b", "ab", "<think>", "[PAD6]"]
        );
        assert_eq!(
            v.token_types,
            vec![
                TOKEN_CONTROL,
                TOKEN_CONTROL,
                TOKEN_NORMAL,
                TOKEN_NORMAL,
                TOKEN_NORMAL,
                TOKEN_USER_DEFINED,
                TOKEN_UNUSED
            ]
        );
        assert_eq!(v.merges, vec!["a b"]);
        assert_eq!((v.bos, v.eos, v.padded), (0, 1, 1));
    }

    #[test]
    fn pair_merges_and_errors() {
        let mut j = sample();
        j["model"]["merges"] = json!([["a", "b"]]);
        assert_eq!(Vocab::from_json(&j, 6).unwrap().merges, vec!["a b"]);
        let e = Vocab::from_json(&sample(), 5).unwrap_err().to_string();
        assert!(e.contains("beyond the model's vocab_size"), "{e}");
        let mut j = sample();
        j["added_tokens"][0]["content"] = json!("<s>");
        assert!(
            Vocab::from_json(&j, 6)
                .unwrap_err()
                .to_string()
                .contains("BOS")
        );
    }
}
