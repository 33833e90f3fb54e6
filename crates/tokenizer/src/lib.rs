//! DeepSeek V4 tokenizer, built only from GGUF metadata.
//!
//! Byte-level BPE (HF `tokenizers` crate: BPE model + the official V4 split regexes +
//! byte-level mapping), with literal matching of special / added tokens done here.
//!
//! Three ways to treat special strings in the input ([`Specials`]):
//! * [`Specials::None`]: everything is BPE text (ds4 `ds4_tokenize_text`).
//! * [`Specials::Chat`]: the seven strings ds4 recognises in rendered chat prompts
//!   (BOS, EOS, `<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>`, `｜DSML｜`; spec
//!   server.md §1.6). This is what `encode(text, true)` does.
//! * [`Specials::All`]: every added token (ids 0..=2 and 128000..), leftmost-longest, which
//!   is what HF `tokenizers` does with the shipped `tokenizer.json`.
//!
//! Decoding is lossless on bytes: ids map back to the exact bytes that produced them;
//! [`StreamDecoder`] turns a token stream into text without ever splitting a UTF-8
//! character.

mod decode;
mod literal;
mod pretok;

use std::collections::HashMap;

use ds4_gguf::GgufFile;
use tokenizers::Model;
use tokenizers::models::bpe::{BPE, Vocab};

pub use decode::StreamDecoder;
use literal::LiteralMatcher;
pub use pretok::{SPLIT_CJK, SPLIT_DIGITS, SPLIT_MAIN};

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp convention).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Literal strings of the tokens ds4 needs by name (looked up by exact string).
pub mod names {
    pub const BOS: &str = "<｜begin▁of▁sentence｜>";
    pub const EOS: &str = "<｜end▁of▁sentence｜>";
    pub const USER: &str = "<｜User｜>";
    pub const ASSISTANT: &str = "<｜Assistant｜>";
    pub const THINK: &str = "<think>";
    pub const THINK_END: &str = "</think>";
    pub const DSML: &str = "｜DSML｜";
    /// Recognised in rendered chat text, in this priority order (server.md §1.6).
    pub const CHAT_SPECIALS: [&str; 7] = [BOS, EOS, USER, ASSISTANT, THINK, THINK_END, DSML];
}

/// `tokenizer.ggml.pre` values that name the V4 split regexes.
pub const KNOWN_PRE: [&str; 2] = ["joyai-llm", "deepseek-v3"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("gguf: {0}")]
    Gguf(#[from] ds4_gguf::Error),
    #[error("tokenizer metadata: {0}")]
    Metadata(String),
    #[error("merge #{index} {merge:?} is not two space-separated symbols")]
    BadMerge { index: usize, merge: String },
    #[error("required token {0:?} is missing from the vocabulary")]
    MissingToken(&'static str),
    #[error("building BPE model: {0}")]
    Build(String),
    #[error("encoding: {0}")]
    Encode(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How special / added token strings in the input are treated by [`Tokenizer::encode_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Specials {
    /// Everything is BPE text.
    None,
    /// The seven ds4 chat specials ([`names::CHAT_SPECIALS`]) are matched literally.
    Chat,
    /// Every added / control token is matched literally (HF `tokenizers` behaviour).
    All,
}

/// Ids of the tokens ds4 needs by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: u32,
    pub eos: u32,
    pub user: u32,
    pub assistant: u32,
    pub think: u32,
    pub think_end: u32,
    pub dsml: u32,
}

pub struct Tokenizer {
    bpe: BPE,
    pre: pretok::V4PreTokenizer,
    tokens: Vec<String>,
    /// Bytes each id decodes to (precomputed so decode is a concatenation).
    token_bytes: Vec<Box<[u8]>>,
    by_string: HashMap<String, u32>,
    is_added: Vec<bool>,
    chat: LiteralMatcher,
    all_added: LiteralMatcher,
    specials: SpecialIds,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("specials", &self.specials)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's metadata only (`tokenizer.ggml.tokens`,
    /// `.merges`, optional `.token_type`, optional `.pre`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let owned = |v: Vec<&str>| v.into_iter().map(str::to_owned).collect::<Vec<_>>();
        let tokens = owned(file.get_str_array("tokenizer.ggml.tokens")?);
        let merges = owned(file.get_str_array("tokenizer.ggml.merges")?);
        let token_types = match file.get("tokenizer.ggml.token_type") {
            None => None,
            Some(v) => Some(int_array(v).ok_or_else(|| {
                Error::Metadata("tokenizer.ggml.token_type is not an integer array".into())
            })?),
        };
        let pre = match file.get("tokenizer.ggml.pre") {
            None => None,
            Some(_) => Some(file.get_str("tokenizer.ggml.pre")?.to_string()),
        };
        Self::from_parts(tokens, merges, token_types, pre.as_deref())
    }

    /// Builds the tokenizer from the raw metadata arrays. `token_types` marks added tokens
    /// (CONTROL / USER_DEFINED); without it, tokens containing U+FF5C and the chat
    /// specials are taken as the added set.
    pub fn from_parts(
        tokens: Vec<String>,
        merges: Vec<String>,
        token_types: Option<Vec<i32>>,
        pre: Option<&str>,
    ) -> Result<Self> {
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            return Err(Error::Metadata(format!(
                "tokenizer.ggml.tokens has {} entries",
                tokens.len()
            )));
        }
        match pre {
            Some(p) if KNOWN_PRE.contains(&p) => {}
            Some(p) => tracing::warn!(
                pre = p,
                "unknown tokenizer.ggml.pre; using the DeepSeek V4 split regexes anyway"
            ),
            None => tracing::warn!("no tokenizer.ggml.pre; using the DeepSeek V4 split regexes"),
        }
        if let Some(tt) = &token_types
            && tt.len() != tokens.len()
        {
            return Err(Error::Metadata(format!(
                "tokenizer.ggml.token_type has {} entries, tokens has {}",
                tt.len(),
                tokens.len()
            )));
        }

        // First occurrence wins if a string appears twice.
        let mut by_string: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            by_string.entry(t.clone()).or_insert(id as u32);
        }
        let lookup = |name: &'static str| {
            by_string
                .get(name)
                .copied()
                .ok_or(Error::MissingToken(name))
        };
        let specials = SpecialIds {
            bos: lookup(names::BOS)?,
            eos: lookup(names::EOS)?,
            user: lookup(names::USER)?,
            assistant: lookup(names::ASSISTANT)?,
            think: lookup(names::THINK)?,
            think_end: lookup(names::THINK_END)?,
            dsml: lookup(names::DSML)?,
        };

        let is_added: Vec<bool> = match &token_types {
            Some(tt) => tt
                .iter()
                .map(|&t| t == token_type::CONTROL || t == token_type::USER_DEFINED)
                .collect(),
            None => tokens
                .iter()
                .map(|t| t.contains('｜') || names::CHAT_SPECIALS.contains(&t.as_str()))
                .collect(),
        };

        let mut merge_pairs = Vec::with_capacity(merges.len());
        for (index, m) in merges.iter().enumerate() {
            match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                    merge_pairs.push((a.to_string(), b.to_string()))
                }
                _ => {
                    return Err(Error::BadMerge {
                        index,
                        merge: m.clone(),
                    });
                }
            }
        }
        let vocab: Vocab = by_string.iter().map(|(s, &id)| (s.clone(), id)).collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab, merge_pairs)
            .build()
            .map_err(|e| Error::Build(e.to_string()))?;
        let bpe = model;
        let pre = pretok::V4PreTokenizer::new()?;

        let token_bytes = tokens
            .iter()
            .zip(&is_added)
            .map(|(t, &added)| decode::token_to_bytes(t, added))
            .collect();

        let chat = LiteralMatcher::new(
            names::CHAT_SPECIALS
                .iter()
                .filter_map(|s| by_string.get(*s).map(|&id| (s.as_bytes().to_vec(), id))),
        );
        let all_added = LiteralMatcher::new(
            tokens
                .iter()
                .zip(&is_added)
                .enumerate()
                .filter(|(_, (_, added))| **added)
                .map(|(id, (t, _))| (t.as_bytes().to_vec(), id as u32)),
        );

        Ok(Self {
            bpe,
            pre,
            tokens,
            token_bytes,
            by_string,
            is_added,
            chat,
            all_added,
            specials,
        })
    }

    /// Encodes `text`. With `allow_specials`, the seven ds4 chat specials are recognised
    /// by literal match ([`Specials::Chat`]); without, everything is BPE text.
    pub fn encode(&self, text: &str, allow_specials: bool) -> Result<Vec<u32>> {
        self.encode_with(
            text,
            if allow_specials {
                Specials::Chat
            } else {
                Specials::None
            },
        )
    }

    /// Encodes `text` with the given treatment of special strings.
    pub fn encode_with(&self, text: &str, specials: Specials) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let matcher = match specials {
            Specials::None => return self.encode_into(text, &mut ids).map(|()| ids),
            Specials::Chat => &self.chat,
            Specials::All => &self.all_added,
        };
        let mut pending = 0;
        for (start, end, id) in matcher.find_iter(text.as_bytes()) {
            // Literals are whole UTF-8 strings, so both ends are char boundaries.
            let span = text.get(pending..start).unwrap_or_default();
            self.encode_into(span, &mut ids)?;
            ids.push(id);
            pending = end;
        }
        self.encode_into(text.get(pending..).unwrap_or_default(), &mut ids)?;
        Ok(ids)
    }

    fn encode_into(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        let mut mapped = String::new();
        self.pre.for_each_piece(text, |piece| {
            // Byte-level alphabet, then BPE (the model caches frequent pieces).
            mapped.clear();
            mapped.extend(piece.bytes().map(decode::byte_to_char));
            let tokens = self
                .bpe
                .tokenize(&mapped)
                .map_err(|e| Error::Encode(e.to_string()))?;
            ids.extend(tokens.iter().map(|t| t.id));
            Ok(())
        })
    }

    /// Bytes of the token sequence (lossless; out-of-range ids give nothing).
    pub fn decode(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id));
        }
        out
    }

    /// Text of the token sequence; invalid UTF-8 becomes U+FFFD.
    pub fn decode_lossy(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode(ids)).into_owned()
    }

    /// Bytes one id decodes to (empty for out-of-range ids). May be a partial UTF-8 char.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], |b| b)
    }

    /// Id of the token whose vocabulary string is exactly `s`.
    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.by_string.get(s).copied()
    }

    /// Vocabulary string (GPT-2 byte alphabet for BPE tokens) of an id.
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Whether `id` is an added / control token (matched literally, decoded verbatim).
    pub fn is_added(&self, id: u32) -> bool {
        self.is_added.get(id as usize).copied().unwrap_or(false)
    }

    /// Number of ids (logits width): 129280 for DeepSeek V4.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn specials(&self) -> SpecialIds {
        self.specials
    }
    pub fn bos(&self) -> u32 {
        self.specials.bos
    }
    pub fn eos(&self) -> u32 {
        self.specials.eos
    }
    pub fn user(&self) -> u32 {
        self.specials.user
    }
    pub fn assistant(&self) -> u32 {
        self.specials.assistant
    }
    pub fn think(&self) -> u32 {
        self.specials.think
    }
    pub fn think_end(&self) -> u32 {
        self.specials.think_end
    }
    pub fn dsml(&self) -> u32 {
        self.specials.dsml
    }
}

fn int_array(v: &ds4_gguf::Value) -> Option<Vec<i32>> {
    use ds4_gguf::Value;
    match v {
        Value::Array { items, .. } => items
            .iter()
            .map(|it| match it {
                Value::I32(x) => Some(*x),
                Value::U32(x) => i32::try_from(*x).ok(),
                Value::I8(x) => Some(i32::from(*x)),
                Value::U8(x) => Some(i32::from(*x)),
                Value::I16(x) => Some(i32::from(*x)),
                Value::U16(x) => Some(i32::from(*x)),
                Value::I64(x) => i32::try_from(*x).ok(),
                Value::U64(x) => i32::try_from(*x).ok(),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tiny_tokens() -> Vec<String> {
        let mut t: Vec<String> = names::CHAT_SPECIALS.iter().map(|s| s.to_string()).collect();
        t.extend(["a", "b", "ab", "Ġ"].map(String::from));
        t
    }

    fn tiny_types() -> Vec<i32> {
        let mut t = vec![token_type::CONTROL, token_type::CONTROL];
        t.extend([token_type::USER_DEFINED; 5]);
        t.extend([token_type::NORMAL; 4]);
        t
    }

    #[test]
    fn tiny_vocab_from_parts() {
        let tok = Tokenizer::from_parts(
            tiny_tokens(),
            vec!["a b".into()],
            Some(tiny_types()),
            Some("joyai-llm"),
        )
        .unwrap();
        assert_eq!(tok.encode("abab", false).unwrap(), vec![9, 9]);
        assert_eq!(tok.encode("a<think>ab", true).unwrap(), vec![7, 4, 9]);
        assert_eq!(tok.encode("ab ab", false).unwrap(), vec![9, 10, 9]);
        assert_eq!(tok.decode(&[9, 10, 4, 9]), b"ab <think>ab");
        assert_eq!(tok.specials().dsml, 6);
        // Unknown `pre` only warns; no token types falls back to the U+FF5C rule.
        let tok =
            Tokenizer::from_parts(tiny_tokens(), vec!["a b".into()], None, Some("gpt2")).unwrap();
        assert!(tok.is_added(2) && tok.is_added(4) && !tok.is_added(9));
    }

    #[test]
    fn bad_metadata_is_a_clear_error() {
        let err = Tokenizer::from_parts(tiny_tokens(), vec!["ab".into()], None, None);
        assert!(matches!(err, Err(Error::BadMerge { index: 0, .. })));
        let err = Tokenizer::from_parts(tiny_tokens(), vec!["a c".into()], None, None);
        assert!(matches!(err, Err(Error::Build(_))));
        let err = Tokenizer::from_parts(tiny_tokens(), vec![], Some(vec![1; 3]), None);
        assert!(matches!(err, Err(Error::Metadata(_))));
        let mut tokens = tiny_tokens();
        tokens.remove(6);
        let err = Tokenizer::from_parts(tokens, vec![], None, None);
        assert!(matches!(err, Err(Error::MissingToken("｜DSML｜"))));
        assert!(matches!(
            Tokenizer::from_parts(vec![], vec![], None, None),
            Err(Error::Metadata(_))
        ));
    }
}
