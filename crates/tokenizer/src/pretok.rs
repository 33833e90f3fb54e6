//! The official DeepSeek V4 pre-tokenizer (`tokenizer.json` `pre_tokenizer`, also what
//! `tokenizer.ggml.pre` = `joyai-llm` / `deepseek-v3` name): three `Isolated` regex splits,
//! then the byte-level mapping without its own regex.

use tokenizers::SplitDelimiterBehavior;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};

use crate::{Error, Result};

/// Digits in groups of at most three.
pub const SPLIT_DIGITS: &str = r"\p{N}{1,3}";
/// Runs of CJK ideographs U+4E00..U+9FA5, Hiragana and Katakana.
pub const SPLIT_CJK: &str = "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+";
/// Words, punctuation runs and whitespace (the GPT-4-like main split).
pub const SPLIT_MAIN: &str = concat!(
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"##,
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+",
    "| ?[\\p{P}\\p{S}]+[\r\n]*",
    "|\\s*[\r\n]+",
    "|\\s+(?!\\S)",
    "|\\s+",
);

pub fn v4_pre_tokenizer() -> Result<PreTokenizerWrapper> {
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(PreTokenizerWrapper::Split)
        .map_err(|e| Error::Build(format!("split regex {re:?}: {e}")))
    };
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        split(SPLIT_DIGITS)?,
        split(SPLIT_CJK)?,
        split(SPLIT_MAIN)?,
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ])))
}
