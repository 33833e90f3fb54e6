//! Every oracle string (oracles/gen_tokenizer.py, HF `tokenizers` 0.23.3 on the official
//! V4 tokenizer.json) must encode to exactly the oracle ids in all three special-token
//! modes, and decode back to the exact input bytes.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use ds4_gguf::GgufFile;
use ds4_tokenizer::{Specials, StreamDecoder, Tokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let file = GgufFile::open(fixtures().join("vocab/deepseek-v4.gguf")).unwrap();
        Tokenizer::from_gguf(&file).unwrap()
    })
}

struct Case {
    text: String,
    plain: Vec<u32>,
    chat: Vec<u32>,
    all: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let raw = std::fs::read_to_string(fixtures().join("tokenizer/cases.jsonl")).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
            .collect()
    };
    raw.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let plain = ids(&v["plain"]);
            Case {
                text: v["text"].as_str().unwrap().to_string(),
                chat: v.get("chat").map_or_else(|| plain.clone(), ids),
                all: v.get("all").map_or_else(|| plain.clone(), ids),
                plain,
            }
        })
        .collect()
}

fn check_mode(mode: Specials, expected: impl Fn(&Case) -> &Vec<u32>) {
    let tok = tokenizer();
    let cases = cases();
    assert!(cases.len() >= 5000, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let got = tok.encode_with(&c.text, mode).unwrap();
        if &got != expected(c) {
            failures.push(format!(
                "{:?}\n  got  {:?}\n  want {:?}",
                c.text,
                got,
                expected(c)
            ));
        }
        assert_eq!(
            tok.decode(&got),
            c.text.as_bytes(),
            "round trip of {:?}",
            c.text
        );
    }
    assert!(
        failures.is_empty(),
        "{mode:?}: {} of {} strings differ, first:\n{}",
        failures.len(),
        cases.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn plain_ids_match_hf() {
    check_mode(Specials::None, |c| &c.plain);
}

#[test]
fn chat_ids_match_oracle() {
    check_mode(Specials::Chat, |c| &c.chat);
}

#[test]
fn all_added_ids_match_hf() {
    check_mode(Specials::All, |c| &c.all);
}

#[test]
fn encode_bool_selects_chat_or_plain() {
    let tok = tokenizer();
    let text = "<｜User｜>hi<｜Assistant｜></think>";
    assert_eq!(
        tok.encode(text, true).unwrap(),
        tok.encode_with(text, Specials::Chat).unwrap()
    );
    assert_eq!(
        tok.encode(text, false).unwrap(),
        tok.encode_with(text, Specials::None).unwrap()
    );
}

#[test]
fn named_tokens_and_vocab() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 129_280);
    let s = tok.specials();
    assert_eq!(
        (
            s.bos,
            s.eos,
            s.user,
            s.assistant,
            s.think,
            s.think_end,
            s.dsml
        ),
        (0, 1, 128_803, 128_804, 128_821, 128_822, 128_825)
    );
    assert_eq!(tok.token_id("hello"), Some(33310));
    assert_eq!(tok.token_id("<｜tool▁calls▁begin｜>"), Some(128_806));
    assert_eq!(tok.token_id("no such token string"), None);
    assert_eq!(tok.token_str(49962), Some(">;Ċ"));
    assert!(tok.is_added(128_825) && !tok.is_added(33310));
    assert_eq!(tok.decode(&[128_803]), "<｜User｜>".as_bytes());
    assert_eq!(tok.decode(&[u32::MAX, 33310, 129_280]), b"hello");
}

#[test]
fn stream_decoder_matches_whole_decode() {
    let tok = tokenizer();
    for c in cases().iter().step_by(7) {
        let ids = tok.encode_with(&c.text, Specials::All).unwrap();
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            let before = out.len();
            d.push(tok, id, &mut out);
            // Whatever came out is whole characters of the input, in order.
            assert!(c.text.as_bytes()[..out.len()].ends_with(&out.as_bytes()[before..]));
            assert!(d.pending().len() < 4);
        }
        d.finish(&mut out);
        assert_eq!(out, c.text);
    }
}
