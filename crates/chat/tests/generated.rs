//! Byte-exact equality with conversations rendered by the official `encoding_dsv4.py`
//! (fixtures/chat/generated, made by oracles/gen_chat.py).

#![allow(clippy::unwrap_used)]
use std::path::PathBuf;

use ds4_chat::{ChatRequest, render};

#[test]
fn generated_conversations_render_byte_exact() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/chat/generated");
    let mut stems: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    stems.sort();
    assert!(
        stems.len() >= 30,
        "expected at least 30 generated conversations"
    );
    let mut failures = Vec::new();
    for json_path in &stems {
        let req = ChatRequest::from_json(&std::fs::read_to_string(json_path).unwrap()).unwrap();
        let want = std::fs::read_to_string(json_path.with_extension("txt")).unwrap();
        match render(&req) {
            Ok(got) if got == want => {}
            Ok(got) => {
                let at = got
                    .bytes()
                    .zip(want.bytes())
                    .position(|(a, b)| a != b)
                    .unwrap_or(got.len().min(want.len()));
                failures.push(format!(
                    "{}: differs at byte {at}\n got: {:?}\nwant: {:?}",
                    json_path.display(),
                    snippet(&got, at),
                    snippet(&want, at)
                ));
            }
            Err(e) => failures.push(format!("{}: error {e}", json_path.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn snippet(text: &str, at: usize) -> String {
    let bytes = text.as_bytes();
    let end = (at + 80).min(bytes.len());
    String::from_utf8_lossy(&bytes[at.saturating_sub(40).min(end)..end]).into_owned()
}

fn jsonl(name: &str) -> Vec<serde_json::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/chat/generated")
        .join(name);
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn random_conversations_render_byte_exact() {
    let cases = jsonl("random_conversations.jsonl");
    assert!(cases.len() >= 300);
    for (i, case) in cases.iter().enumerate() {
        let req: ChatRequest = serde_json::from_value(case["request"].clone()).unwrap();
        let got = render(&req).unwrap();
        assert_eq!(
            got,
            case["prompt"].as_str().unwrap(),
            "random conversation {i}"
        );
    }
}

#[test]
fn random_completions_parse_like_official() {
    use ds4_chat::{ThinkingMode, parse_completion};
    let cases = jsonl("random_completions.jsonl");
    assert!(cases.len() >= 300);
    for (i, case) in cases.iter().enumerate() {
        let mode = match case["thinking_mode"].as_str().unwrap() {
            "chat" => ThinkingMode::Chat,
            _ => ThinkingMode::Thinking,
        };
        let text = case["text"].as_str().unwrap();
        let p = parse_completion(text, mode);
        assert_eq!(
            p.reasoning.clone().unwrap_or_default(),
            case["reasoning"].as_str().unwrap(),
            "completion {i}"
        );
        assert_eq!(p.reasoning.is_some(), mode == ThinkingMode::Thinking);
        assert_eq!(
            p.content,
            case["content"].as_str().unwrap(),
            "completion {i}"
        );
        let want = case["tool_calls"].as_array().unwrap();
        assert_eq!(p.tool_calls.len(), want.len(), "completion {i}");
        for (got, want) in p.tool_calls.iter().zip(want) {
            assert_eq!(got.name, want["name"].as_str().unwrap(), "completion {i}");
            assert_eq!(
                serde_json::Value::Object(got.arguments.clone()),
                want["arguments"],
                "completion {i}"
            );
            // Key order is the order the model wrote.
            let keys: Vec<&String> = got.arguments.keys().collect();
            let want_keys: Vec<&String> = want["arguments"].as_object().unwrap().keys().collect();
            assert_eq!(keys, want_keys, "completion {i}");
        }
        // content + raw_dsml reproduces the sampled text before EOS.
        let before_eos = text.split("<｜end▁of▁sentence｜>").next().unwrap();
        let after_reasoning = match mode {
            ThinkingMode::Thinking => &before_eos[before_eos.find("</think>").unwrap() + 8..],
            ThinkingMode::Chat => before_eos,
        };
        assert_eq!(
            format!("{}{}", p.content, p.raw_dsml.unwrap_or_default()),
            after_reasoning,
            "completion {i}"
        );
    }
}
