//! Completion parsing: DSML forms from the spec and the official format, malformed and
//! truncated blocks, and whole-text vs incremental agreement for arbitrary splits.

#![allow(clippy::unwrap_used)]
use ds4_chat::{
    CompletionStream, Message, ParsedCompletion, StreamEvent, ThinkingMode, ToolCall,
    attach_replay, parse_completion, render_messages, render_tool_calls,
};
use proptest::prelude::*;
use serde_json::json;

const B: &str = "<｜DSML｜tool_calls>";
const BE: &str = "</｜DSML｜tool_calls>";

fn invoke(name: &str, params: &[(&str, &str, &str)]) -> String {
    let mut s = format!("<｜DSML｜invoke name=\"{name}\">\n");
    for (k, is_str, v) in params {
        s.push_str(&format!(
            "<｜DSML｜parameter name=\"{k}\" string=\"{is_str}\">{v}</｜DSML｜parameter>\n"
        ));
    }
    s.push_str("</｜DSML｜invoke>");
    s
}

/// Runs the stream over `chunks` and checks its events rebuild its own result.
fn stream(chunks: &[&str], mode: ThinkingMode) -> ParsedCompletion {
    let mut s = CompletionStream::new(mode);
    let mut events = Vec::new();
    for c in chunks {
        events.extend(s.push(c));
    }
    events.extend(s.finish());
    let mut reasoning = String::new();
    let mut content = String::new();
    let mut args: Vec<String> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut raw = None;
    for e in events {
        match e {
            StreamEvent::ReasoningDelta(t) => reasoning.push_str(&t),
            StreamEvent::ContentDelta(t) => content.push_str(&t),
            StreamEvent::ToolCallStart { index, name } => {
                assert_eq!(index, names.len());
                names.push(name);
                args.push(String::new());
            }
            StreamEvent::ToolCallArgsDelta {
                index,
                json_fragment,
            } => args[index].push_str(&json_fragment),
            StreamEvent::ToolCallEnd { index, raw_invoke } => {
                assert_eq!(s.parsed().tool_calls[index].raw_invoke, raw_invoke)
            }
            StreamEvent::ToolBlockEnd { raw_dsml } => raw = Some(raw_dsml),
        }
    }
    let parsed = s.into_parsed();
    assert_eq!(parsed.reasoning.clone().unwrap_or_default(), reasoning);
    assert_eq!(parsed.content, content);
    assert_eq!(parsed.raw_dsml, raw);
    let want_names: Vec<String> = parsed.tool_calls.iter().map(|c| c.name.clone()).collect();
    assert_eq!(names, want_names);
    let want_args: Vec<String> = parsed
        .tool_calls
        .iter()
        .map(|c| c.arguments_json())
        .collect();
    assert_eq!(args, want_args);
    parsed
}

fn check_both(text: &str, mode: ThinkingMode) -> ParsedCompletion {
    let whole = parse_completion(text, mode);
    assert_eq!(stream(&[text], mode), whole);
    // Every single split point and char-by-char feeding agree too.
    let bounds: Vec<usize> = (0..=text.len())
        .filter(|i| text.is_char_boundary(*i))
        .collect();
    for &i in &bounds {
        assert_eq!(
            stream(&[&text[..i], &text[i..]], mode),
            whole,
            "split at {i}"
        );
    }
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
    assert_eq!(stream(&refs, mode), whole, "char by char");
    whole
}

#[test]
fn spec_example_reasoning_content_and_call() {
    let block = format!(
        "{B}\n{}\n{BE}",
        invoke(
            "bash",
            &[
                ("description", "true", "list files"),
                ("command", "true", "ls -la")
            ]
        )
    );
    let text = format!("need a tool</think>I will inspect the files.\n\n\n\n{block}");
    let p = check_both(&text, ThinkingMode::Thinking);
    assert_eq!(p.reasoning.as_deref(), Some("need a tool"));
    // Official parser semantics: content runs up to "\n\n<｜DSML｜tool_calls".
    assert_eq!(p.content, "I will inspect the files.\n\n");
    assert_eq!(p.tool_calls.len(), 1);
    assert_eq!(p.tool_calls[0].name, "bash");
    assert_eq!(
        p.tool_calls[0].arguments_json(),
        r#"{"description":"list files","command":"ls -la"}"#
    );
    assert_eq!(p.raw_dsml.as_deref(), Some(format!("\n\n{block}").as_str()));
    assert_eq!(
        format!("{}{}", p.content, p.raw_dsml.unwrap()),
        &text[text.find("I will").unwrap()..]
    );
}

#[test]
fn string_flags_multiple_invokes_and_nested_json() {
    let block = format!(
        "{B}\n{}\n{}\n{BE}",
        invoke(
            "edit",
            &[
                ("path", "true", "/tmp/a b.txt"),
                ("flag", "true", "true"),
                ("count", "false", "3"),
                ("ratio", "false", "1.50"),
                ("enabled", "false", "false"),
                (
                    "opts",
                    "false",
                    "{\"a\": [1, {\"b\": null}], \"c\": \"x y\"}"
                ),
                ("empty", "false", ""),
                ("bad", "false", "not json"),
            ]
        ),
        invoke("noop", &[])
    );
    let text = format!("Working on it.\n\n{block}<｜end▁of▁sentence｜>");
    let p = check_both(&text, ThinkingMode::Chat);
    assert_eq!(p.reasoning, None);
    assert_eq!(p.content, "Working on it.");
    assert_eq!(p.tool_calls.len(), 2);
    assert_eq!(
        serde_json::Value::Object(p.tool_calls[0].arguments.clone()),
        json!({"path": "/tmp/a b.txt", "flag": "true", "count": 3, "ratio": 1.5,
               "enabled": false, "opts": {"a": [1, {"b": null}], "c": "x y"},
               "empty": null, "bad": "not json"})
    );
    let keys: Vec<&String> = p.tool_calls[0].arguments.keys().collect();
    assert_eq!(
        keys,
        [
            "path", "flag", "count", "ratio", "enabled", "opts", "empty", "bad"
        ]
    );
    assert_eq!(p.tool_calls[1].name, "noop");
    assert_eq!(p.tool_calls[1].arguments_json(), "{}");
}

#[test]
fn string_values_are_kept_verbatim() {
    let v = "a < b && c > d &lt; \"q\" \n multi\nline";
    let text = format!("{B}\n{}\n{BE}", invoke("t", &[("s", "true", v)]));
    let p = check_both(&text, ThinkingMode::Chat);
    assert_eq!(p.tool_calls[0].arguments["s"], json!(v));
    assert_eq!(p.content, "");
    assert_eq!(p.raw_dsml.as_deref(), Some(text.as_str()));
}

#[test]
fn loose_nested_parameters_become_an_object() {
    let text = format!(
        "{B}\n<｜DSML｜invoke name=\"edit\">\n<｜DSML｜parameter name=\"edits\">\n<｜DSML｜parameter name=\"oldText\" string=\"true\">old</｜DSML｜parameter>\n<｜DSML｜parameter name=\"newText\" string=\"true\">new text</｜DSML｜parameter>\n</｜DSML｜invoke>\n{BE}"
    );
    let p = check_both(&text, ThinkingMode::Chat);
    assert_eq!(
        p.tool_calls[0].arguments_json(),
        r#"{"edits":{"oldText":"old","newText":"new text"}}"#
    );
}

#[test]
fn missing_string_attribute_means_string() {
    let text = format!(
        "{B}<｜DSML｜invoke name=\"r\"><｜DSML｜parameter name=\"path\">/tmp/x</｜DSML｜parameter></｜DSML｜invoke>{BE}"
    );
    let p = check_both(&text, ThinkingMode::Chat);
    assert_eq!(p.tool_calls[0].arguments_json(), r#"{"path":"/tmp/x"}"#);
}

#[test]
fn malformed_or_truncated_blocks_are_content() {
    let good = invoke("t", &[("a", "true", "1")]);
    let cases = [
        // never closed
        format!("pre\n\n{B}\n{good}\n"),
        // invoke without name
        format!("pre\n\n{B}\n<｜DSML｜invoke>\n</｜DSML｜invoke>\n{BE}"),
        // parameter never closed
        format!(
            "pre\n\n{B}\n<｜DSML｜invoke name=\"t\">\n<｜DSML｜parameter name=\"a\" string=\"true\">1\n</｜DSML｜invoke>\n{BE}"
        ),
        // stray text between invokes
        format!("pre\n\n{B}\n{good}\noops\n{good}\n{BE}"),
        // invoke never closed
        format!("pre\n\n{B}\n<｜DSML｜invoke name=\"t\">\n{BE} after"),
        // tag glued to attribute
        format!("pre\n\n{B}\n<｜DSML｜invokename=\"t\">\n</｜DSML｜invoke>\n{BE}"),
    ];
    for text in &cases {
        let p = check_both(text, ThinkingMode::Chat);
        assert!(p.tool_calls.is_empty(), "{text:?}");
        assert_eq!(&p.content, text);
        assert_eq!(p.raw_dsml, None);
    }
    // In thinking mode the reasoning is still split off.
    let text = format!("r</think>{}", cases[0]);
    let p = check_both(&text, ThinkingMode::Thinking);
    assert_eq!(p.reasoning.as_deref(), Some("r"));
    assert_eq!(p.content, cases[0]);
}

#[test]
fn reasoning_rules() {
    // Truncated reasoning: everything is reasoning.
    let p = check_both("still thinking </thi", ThinkingMode::Thinking);
    assert_eq!(p.reasoning.as_deref(), Some("still thinking </thi"));
    assert_eq!(p.content, "");
    // A leading <think> is skipped; DSML inside reasoning is not a call.
    let text = format!("<think>maybe {B}\n{}\n{BE}</think>answer", invoke("t", &[]));
    let p = check_both(&text, ThinkingMode::Thinking);
    assert!(p.tool_calls.is_empty());
    assert_eq!(p.content, "answer");
    // Chat mode: </think> is ordinary content.
    let p = check_both("a</think>b", ThinkingMode::Chat);
    assert_eq!(p.reasoning, None);
    assert_eq!(p.content, "a</think>b");
    // EOS ends the text.
    let p = check_both(
        "r</think>done<｜end▁of▁sentence｜>junk",
        ThinkingMode::Thinking,
    );
    assert_eq!(p.content, "done");
    // Text after a parsed block is ignored.
    let text = format!("x\n\n{B}\n{}\n{BE}\ntrailing", invoke("t", &[]));
    let p = check_both(&text, ThinkingMode::Chat);
    assert_eq!(p.content, "x");
    assert_eq!(p.tool_calls.len(), 1);
}

#[test]
fn canonical_render_parses_back_and_replays() {
    let calls: Vec<ToolCall> = serde_json::from_value(json!([
        {"id": "call_1", "type": "function", "function": {"name": "bash",
            "arguments": "{\"command\": \"ls -la && echo <done>\", \"timeout\": 10, \"env\": {\"A\": [1, 2.5]}}"}},
        {"id": "call_2", "type": "function", "function": {"name": "search", "arguments": "{}"}}
    ]))
    .unwrap();
    let dsml = render_tool_calls(&calls).unwrap();
    let text = format!("thinking</think>{dsml}");
    let p = check_both(&text, ThinkingMode::Thinking);
    assert_eq!(p.raw_dsml.as_deref(), Some(dsml.as_str()));
    assert_eq!(
        p.tool_calls[0].arguments_json(),
        r#"{"command":"ls -la && echo <done>","timeout":10,"env":{"A":[1,2.5]}}"#
    );
    assert_eq!(p.tool_calls[1].arguments_json(), "{}");

    // Exact replay: sampled bytes with odd spacing are rendered back verbatim when all
    // call ids map to the same block.
    let sampled = format!(
        "\n\n{B}\n\n{}\n  {}\n{BE}",
        invoke(
            "bash",
            &[
                ("command", "true", "ls -la && echo <done>"),
                ("timeout", "false", " 10 ")
            ]
        ),
        invoke("search", &[])
    );
    let mut assistant = Message::new("assistant", "");
    assistant.reasoning_content = Some("thinking".into());
    assistant.tool_calls = Some(calls);
    let mut messages = vec![
        Message::new("user", "go"),
        assistant,
        Message::new("tool", "ok"),
    ];
    let canonical = render_messages(&messages, ThinkingMode::Thinking, None, true).unwrap();
    assert!(canonical.contains(&dsml));
    // One unknown id: no replay.
    attach_replay(&mut messages, |id| {
        (id == "call_1").then_some(sampled.as_str())
    });
    assert!(messages[1].raw_dsml.is_none());
    attach_replay(&mut messages, |_| Some(sampled.as_str()));
    let replayed = render_messages(&messages, ThinkingMode::Thinking, None, true).unwrap();
    assert_eq!(replayed, canonical.replace(&dsml, &sampled));
}

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z \n<>/&\"]{0,8}",
        Just("\n\n".to_string()),
        Just("<think>".to_string()),
        Just("</think>".to_string()),
        Just("</thi".to_string()),
        Just("<｜end▁of▁sentence｜>".to_string()),
        Just("<｜end▁of".to_string()),
        Just(B.to_string()),
        Just(BE.to_string()),
        Just("<｜DSML｜tool".to_string()),
        Just("<｜DSML｜invoke name=\"t\">\n".to_string()),
        Just("</｜DSML｜invoke>\n".to_string()),
        Just(
            "<｜DSML｜parameter name=\"k\" string=\"true\">v 🙂</｜DSML｜parameter>\n".to_string()
        ),
        Just(
            "<｜DSML｜parameter name=\"n\" string=\"false\">[1, 2]</｜DSML｜parameter>\n"
                .to_string()
        ),
        Just(format!(
            "\n\n{B}\n{}\n{BE}",
            invoke("w", &[("x", "true", "é")])
        )),
        Just("ü日".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn whole_and_incremental_agree(
        pieces in prop::collection::vec(piece(), 0..12),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        thinking in any::<bool>(),
    ) {
        let text: String = pieces.concat();
        let mode = if thinking { ThinkingMode::Thinking } else { ThinkingMode::Chat };
        let bounds: Vec<usize> = (0..=text.len()).filter(|i| text.is_char_boundary(*i)).collect();
        let mut points: Vec<usize> = cuts.iter().map(|c| bounds[c.index(bounds.len())]).collect();
        points.sort();
        let mut chunks = Vec::new();
        let mut last = 0;
        for p in points {
            chunks.push(&text[last..p]);
            last = p;
        }
        chunks.push(&text[last..]);
        prop_assert_eq!(stream(&chunks, mode), parse_completion(&text, mode));
    }
}
