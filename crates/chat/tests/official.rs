//! Byte-exact equality with the four gold vectors shipped with DeepSeek's official
//! `encoding_dsv4.py` (fixtures/chat/official, copied from the release's encoding/tests).

#![allow(clippy::unwrap_used)]
use std::path::PathBuf;

use ds4_chat::{ChatRequest, ThinkingMode, parse_completion, render};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/chat/official")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(dir().join(name)).unwrap()
}

#[test]
fn gold_requests_render_byte_exact() {
    for i in 1..=4 {
        let req = ChatRequest::from_json(&read(&format!("request_{i}.json"))).unwrap();
        let want = read(&format!("test_output_{i}.txt"));
        let got = render(&req).unwrap();
        assert_eq!(got, want, "gold vector {i}");
    }
}

#[test]
fn gold_raw_inputs_render_byte_exact() {
    // The raw official inputs: case 1 is {tools, messages} (the official test puts the
    // tools on messages[0]); cases 2-4 are bare message lists. Case 4 is chat mode.
    for (i, mode) in [
        (1, ThinkingMode::Thinking),
        (2, ThinkingMode::Thinking),
        (3, ThinkingMode::Thinking),
        (4, ThinkingMode::Chat),
    ] {
        let raw: serde_json::Value =
            serde_json::from_str(&read(&format!("test_input_{i}.json"))).unwrap();
        let mut req: ChatRequest = match raw {
            serde_json::Value::Array(_) => {
                serde_json::from_value(serde_json::json!({ "messages": raw })).unwrap()
            }
            obj => serde_json::from_value(obj).unwrap(),
        };
        req.thinking_mode = mode;
        let want = read(&format!("test_output_{i}.txt"));
        assert_eq!(render(&req).unwrap(), want, "gold vector {i}");
    }
}

#[test]
fn gold_assistant_turns_parse_back() {
    // As the official test does: the first assistant turn of case 1 parses to its call.
    let prompt = read("test_output_1.txt");
    let marker = "<｜Assistant｜><think>";
    let start = prompt.find(marker).unwrap() + marker.len();
    let end = prompt[start..].find("<｜User｜>").unwrap() + start;
    let parsed = parse_completion(&prompt[start..end], ThinkingMode::Thinking);
    assert_eq!(
        parsed.reasoning.as_deref(),
        Some("The user wants to know the weather in Beijing. I should use the get_weather tool.")
    );
    assert_eq!(parsed.content, "");
    assert_eq!(parsed.tool_calls.len(), 1);
    assert_eq!(parsed.tool_calls[0].name, "get_weather");
    assert_eq!(
        parsed.tool_calls[0].arguments_json(),
        r#"{"location":"Beijing","unit":"celsius"}"#
    );
    // content + raw_dsml + EOS reproduces the sampled turn byte for byte.
    let raw = parsed.raw_dsml.unwrap();
    assert!(prompt[start..end].ends_with(&format!("{raw}<｜end▁of▁sentence｜>")));

    let last = prompt.rfind(marker).unwrap() + marker.len();
    let parsed = parse_completion(&prompt[last..], ThinkingMode::Thinking);
    assert_eq!(
        parsed.reasoning.as_deref(),
        Some("Got the weather data. Let me format a nice response.")
    );
    assert!(parsed.content.contains("22°C"));
    assert!(parsed.tool_calls.is_empty());
}
