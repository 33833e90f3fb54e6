//! The official DeepSeek V4 pre-tokenizer (`tokenizer.json` `pre_tokenizer`, also what
//! `tokenizer.ggml.pre` = `joyai-llm` / `deepseek-v3` name): three `Isolated` regex splits,
//! then the byte-level mapping without its own regex.
//!
//! The third regex's `\s+(?!\S)` alternative needs a look-ahead, which forces
//! fancy-regex's slow backtracking engine on the whole pattern. We run the pattern without
//! that alternative (a plain automaton) and apply its effect by hand: a whitespace-only
//! match of two or more characters that is followed by a non-whitespace character gives
//! back its last character, and matching resumes there. That is exactly what
//! `\s+(?!\S)|\s+` does, since those are the only alternatives that match whitespace
//! without a newline.

use tokenizers::utils::SysRegex;

use crate::{Error, Result};

/// Digits in groups of at most three.
pub const SPLIT_DIGITS: &str = r"\p{N}{1,3}";
/// Runs of CJK ideographs U+4E00..U+9FA5, Hiragana and Katakana.
pub const SPLIT_CJK: &str = "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+";
/// Words, punctuation runs and whitespace, exactly as in `tokenizer.json`.
pub const SPLIT_MAIN: &str = concat!(
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"##,
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+",
    "| ?[\\p{P}\\p{S}]+[\r\n]*",
    "|\\s*[\r\n]+",
    "|\\s+(?!\\S)",
    "|\\s+",
);
/// [`SPLIT_MAIN`] without the look-ahead alternative (see the module docs).
const SPLIT_MAIN_NO_LOOKAHEAD: &str = concat!(
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"##,
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+",
    "| ?[\\p{P}\\p{S}]+[\r\n]*",
    "|\\s*[\r\n]+",
    "|\\s+",
);

pub struct V4PreTokenizer {
    digits: SysRegex,
    cjk: SysRegex,
    main: SysRegex,
}

impl V4PreTokenizer {
    pub fn new() -> Result<Self> {
        let compile = |re: &str| -> Result<SysRegex> {
            SysRegex::new(re).map_err(|e| Error::Build(format!("split regex {re:?}: {e}")))
        };
        Ok(Self {
            digits: compile(SPLIT_DIGITS)?,
            cjk: compile(SPLIT_CJK)?,
            main: compile(SPLIT_MAIN_NO_LOOKAHEAD)?,
        })
    }

    /// Calls `f` on each pre-token of `text`, in order (they concatenate to `text`).
    pub fn for_each_piece<E>(
        &self,
        text: &str,
        mut f: impl FnMut(&str) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        isolated(&self.digits, text, &mut |a| {
            isolated(&self.cjk, a, &mut |b| main_split(&self.main, b, &mut f))
        })
    }
}

/// `Isolated` split: matches and the stretches between them, in order, none empty.
fn isolated<E>(
    regex: &SysRegex,
    text: &str,
    f: &mut dyn FnMut(&str) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let mut prev = 0;
    for (start, end) in regex.find_iter(text) {
        if start > prev {
            f(text.get(prev..start).unwrap_or_default())?;
        }
        if end > start {
            f(text.get(start..end).unwrap_or_default())?;
        }
        prev = end;
    }
    if prev < text.len() {
        f(text.get(prev..).unwrap_or_default())?;
    }
    Ok(())
}

/// The third split with the look-ahead alternative applied by hand (module docs).
fn main_split<E>(
    regex: &SysRegex,
    text: &str,
    f: &mut dyn FnMut(&str) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let mut prev = 0; // end of the last emitted piece
    let mut search_from = 0;
    'restart: while search_from < text.len() {
        let hay = text.get(search_from..).unwrap_or_default();
        for (s, e) in regex.find_iter(hay) {
            let (start, mut end) = (s + search_from, e + search_from);
            let m = text.get(start..end).unwrap_or_default();
            let give_back = is_plain_space_run(m)
                && m.chars().nth(1).is_some()
                && text
                    .get(end..)
                    .and_then(|rest| rest.chars().next())
                    .is_some_and(|c| !c.is_whitespace());
            if give_back {
                end -= m.chars().next_back().map_or(0, char::len_utf8);
            }
            if start > prev {
                f(text.get(prev..start).unwrap_or_default())?;
            }
            if end > start {
                f(text.get(start..end).unwrap_or_default())?;
            }
            prev = end;
            if give_back {
                search_from = end;
                continue 'restart;
            }
        }
        break;
    }
    if prev < text.len() {
        f(text.get(prev..).unwrap_or_default())?;
    }
    Ok(())
}

/// Whitespace only, without `\r` / `\n` (what `\s+(?!\S)|\s+` can match here).
fn is_plain_space_run(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_whitespace() && c != '\r' && c != '\n')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{
        OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior,
    };

    /// Reference: HF `Split` pre-tokenizers with the original look-ahead regex.
    fn hf_pieces(text: &str) -> Vec<String> {
        let mut pts = PreTokenizedString::from(text);
        for re in [SPLIT_DIGITS, SPLIT_CJK, SPLIT_MAIN] {
            Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .unwrap()
            .pre_tokenize(&mut pts)
            .unwrap();
        }
        pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect()
    }

    fn our_pieces(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        V4PreTokenizer::new()
            .unwrap()
            .for_each_piece(text, |p| {
                out.push(p.to_string());
                Ok::<(), ()>(())
            })
            .unwrap();
        out
    }

    #[test]
    fn matches_the_lookahead_regex() {
        for text in [
            "    int x = 12345;\n",
            "a  b   c\t\td \u{3000}\u{3000}e  ",
            "x  \n  y \r\n\r\n  z",
            "  (a)   [b]  \u{a0} c\u{2028}\u{2028}d",
            "   ",
            " ",
            "",
            "a \u{85}\u{85}b",
            "foo   123   中文   bar",
            "x1234567  ９９９９ 中文字符abc",
        ] {
            assert_eq!(our_pieces(text), hf_pieces(text), "{text:?}");
        }
    }
}
