//! End-to-end tests of every endpoint over real HTTP against the scripted generator.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;
use ds4_server::ServerConfig;

fn rendered_len(messages: Value, thinking: bool, tools: Option<Vec<Value>>) -> usize {
    // Independent count: ds4-chat renders (checked against the official gold vectors),
    // and the scripted codec is one token per byte.
    let mut req: ds4_chat::ChatRequest =
        serde_json::from_value(json!({"messages": messages})).unwrap();
    req.thinking_mode = if thinking {
        ds4_chat::ThinkingMode::Thinking
    } else {
        ds4_chat::ThinkingMode::Chat
    };
    req.tools = tools;
    ds4_chat::render(&req).unwrap().len()
}

#[tokio::test]
async fn models_and_health() {
    let s = start(ServerConfig::default()).await;
    let r = get(s.addr, "/v1/models", &[]).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "deepseek-v4-flash");
    assert_eq!(v["data"][0]["context_length"], 32768);
    let r = get(s.addr, "/v1/models/deepseek-chat", &[]).await;
    assert_eq!(r.json()["id"], "deepseek-chat");
    let r = get(s.addr, "/v1/models/gpt-9", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = get(s.addr, "/v1/models", &[("anthropic-version", "2023-06-01")]).await;
    assert_eq!(r.json()["data"][0]["type"], "model");
    let r = get(s.addr, "/health", &[]).await;
    assert_eq!(r.json()["status"], "ok");
    let r = get(s.addr, "/v1/nope", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn chat_completion_thinking_and_plain() {
    let s = start(ServerConfig::default()).await;
    let messages =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"model": "deepseek-v4-flash", "messages": messages}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    let m = &v["choices"][0]["message"];
    assert_eq!(m["content"], "Hello there!");
    assert_eq!(m["reasoning_content"], "Let me think.");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let expected_prompt = rendered_len(messages.clone(), true, None);
    assert_eq!(v["usage"]["prompt_tokens"], expected_prompt);
    assert_eq!(
        v["usage"]["completion_tokens"],
        "Let me think.</think>Hello there!".len()
    );
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        "Let me think.</think>".len()
    );

    // deepseek-chat: no thinking; thinking:{type:disabled} does the same on the flash alias.
    for body in [
        json!({"model": "deepseek-chat", "messages": messages}),
        json!({"model": "deepseek-v4-flash", "messages": messages, "thinking": {"type": "disabled"}}),
    ] {
        let v = post(s.addr, "/v1/chat/completions", &body).await.json();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello there!");
        assert!(
            v["choices"][0]["message"]
                .get("reasoning_content")
                .is_none()
        );
        assert_eq!(
            v["usage"]["prompt_tokens"],
            rendered_len(messages.clone(), false, None)
        );
    }
}

#[tokio::test]
async fn chat_streaming_with_tool_call_and_usage() {
    let s = start(ServerConfig::default()).await;
    let body = json!({"model": "deepseek-v4-flash", "stream": true, "stream_options": {"include_usage": true},
        "tools": [list_files_tool()], "messages": [{"role": "user", "content": "please list files"}]});
    let r = post(s.addr, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (events, _) = sse(&r.text());
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(SseEvent::json)
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut reasoning = String::new();
    let mut content = String::new();
    let mut name_seen_before_args = false;
    let mut args = String::new();
    let mut id = String::new();
    let mut finish = Value::Null;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        let Some(choice) = c["choices"].get(0) else {
            continue;
        };
        let d = &choice["delta"];
        if let Some(t) = d["reasoning_content"].as_str() {
            reasoning.push_str(t);
        }
        if let Some(t) = d["content"].as_str() {
            content.push_str(t);
        }
        if let Some(tc) = d["tool_calls"].get(0) {
            assert_eq!(tc["index"], 0);
            if let Some(n) = tc["function"]["name"].as_str() {
                assert_eq!(n, "list_files");
                assert!(args.is_empty());
                name_seen_before_args = true;
                id = tc["id"].as_str().unwrap().to_string();
            }
            args.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    assert!(name_seen_before_args);
    assert!(id.starts_with("call_") && id.len() == 37);
    assert_eq!(reasoning, "The user wants files.");
    assert_eq!(content, "I will list them.");
    let parsed: Value = serde_json::from_str(&args).unwrap();
    assert_eq!(parsed, json!({"path": "src & docs", "depth": [1, 2]}));
    assert_eq!(finish, "tool_calls");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(
        chunks.last().unwrap()["choices"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
}

/// The sampled DSML is replayed byte-exactly when the client sends the call back, so the
/// next prompt extends the engine's live session (all previous tokens are reused).
#[tokio::test]
async fn exact_replay_keeps_the_live_session_openai_and_anthropic() {
    let s = start(ServerConfig::default()).await;
    let user = json!({"role": "user", "content": "please list files"});
    let first = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"tools": [list_files_tool()], "messages": [user.clone()]}),
    )
    .await
    .json();
    let msg = &first["choices"][0]["message"];
    let call = &msg["tool_calls"][0];
    assert_eq!(
        call["function"]["arguments"],
        r#"{"path":"src & docs","depth":[1,2]}"#
    );
    let live = first["usage"]["total_tokens"].as_u64().unwrap();
    let history = |call: Value| {
        json!({"tools": [list_files_tool()], "messages": [user.clone(),
        {"role": "assistant", "content": msg["content"], "reasoning_content": msg["reasoning_content"], "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "x", "content": "a.txt"}]})
    };
    let mut body = history(call.clone());
    body["messages"][2]["tool_call_id"] = call["id"].clone();
    let second = post(s.addr, "/v1/chat/completions", &body).await.json();
    assert_eq!(
        second["usage"]["prompt_tokens_details"]["cached_tokens"], live,
        "{second}"
    );
    assert!(second["usage"]["prompt_tokens"].as_u64().unwrap() > live);

    // Without a known id the call is rendered canonically ([1,2] instead of [1,  2]):
    // the live session no longer matches.
    let _ = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"tools": [list_files_tool()], "messages": [user.clone()]}),
    )
    .await;
    let mut unknown = call.clone();
    unknown["id"] = json!("call_unknown");
    let third = post(s.addr, "/v1/chat/completions", &history(unknown))
        .await
        .json();
    assert_eq!(third["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    // Anthropic: tool_use ids (toolu_) replay the same way.
    let tools = json!([{"name": "list_files", "description": "List files", "input_schema": list_files_tool()["function"]["parameters"]}]);
    let first = post(
        s.addr,
        "/v1/messages",
        &json!({"max_tokens": 2000, "tools": tools,
        "messages": [{"role": "user", "content": "please list files"}]}),
    )
    .await
    .json();
    assert_eq!(first["stop_reason"], "tool_use");
    let blocks = first["content"].as_array().unwrap();
    let tool_use = blocks.iter().find(|b| b["type"] == "tool_use").unwrap();
    assert!(tool_use["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(
        tool_use["input"],
        json!({"path": "src & docs", "depth": [1, 2]})
    );
    let u = &first["usage"];
    let live = u["input_tokens"].as_u64().unwrap()
        + u["cache_read_input_tokens"].as_u64().unwrap()
        + u["output_tokens"].as_u64().unwrap();
    let second = post(s.addr, "/v1/messages", &json!({"max_tokens": 2000, "tools": tools, "messages": [
        {"role": "user", "content": "please list files"},
        {"role": "assistant", "content": blocks},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"], "content": "a.txt"}]}]})).await.json();
    assert_eq!(second["usage"]["cache_read_input_tokens"], live, "{second}");
}

#[tokio::test]
async fn anthropic_messages_streaming_lifecycle() {
    let s = start(ServerConfig::default()).await;
    let tools = json!([{"name": "list_files", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]);
    let r = post_with(
        s.addr,
        "/v1/messages",
        &json!({"model": "deepseek-v4-flash", "max_tokens": 500, "stream": true,
        "system": [{"type": "text", "text": "You are Claude Code."}], "tools": tools,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "list files"}]}]}),
        &[
            ("anthropic-version", "2023-06-01"),
            ("x-api-key", "ignored"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let (events, _) = sse(&r.text());
    let names: Vec<String> = events.iter().map(|e| e.event.clone().unwrap()).collect();
    for e in &events {
        assert_eq!(
            e.json()["type"],
            e.event.as_deref().unwrap(),
            "event name equals data type"
        );
    }
    assert_eq!(names.first().unwrap(), "message_start");
    assert_eq!(names.last().unwrap(), "message_stop");
    assert_eq!(names[names.len() - 2], "message_delta");
    let data: Vec<Value> = events.iter().map(SseEvent::json).collect();
    // Blocks: thinking (0), text (1), tool_use (2); each started and stopped in order.
    let starts: Vec<&Value> = data
        .iter()
        .filter(|d| d["type"] == "content_block_start")
        .collect();
    let kinds: Vec<&str> = starts
        .iter()
        .map(|d| d["content_block"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["thinking", "text", "tool_use"]);
    for (i, st) in starts.iter().enumerate() {
        assert_eq!(st["index"], i);
    }
    let mut thinking = String::new();
    let mut text = String::new();
    let mut json_parts = String::new();
    let mut signature = false;
    for d in &data {
        if d["type"] == "content_block_delta" {
            match d["delta"]["type"].as_str().unwrap() {
                "thinking_delta" => thinking.push_str(d["delta"]["thinking"].as_str().unwrap()),
                "text_delta" => text.push_str(d["delta"]["text"].as_str().unwrap()),
                "input_json_delta" => {
                    json_parts.push_str(d["delta"]["partial_json"].as_str().unwrap())
                }
                "signature_delta" => signature = true,
                other => panic!("unexpected delta {other}"),
            }
        }
    }
    assert!(signature);
    assert_eq!(thinking, "The user wants files.");
    assert_eq!(text, "I will list them.");
    assert_eq!(
        serde_json::from_str::<Value>(&json_parts).unwrap(),
        json!({"path": "src & docs", "depth": [1, 2]})
    );
    let delta = &data[data.len() - 2];
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert!(delta["usage"]["output_tokens"].as_u64().unwrap() > 0);
    assert_eq!(starts[2]["content_block"]["name"], "list_files");

    // count_tokens equals the prompt the same request would use.
    let req = json!({"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100});
    let n = post(s.addr, "/v1/messages/count_tokens", &req).await.json()["input_tokens"]
        .as_u64()
        .unwrap();
    let v = post(s.addr, "/v1/messages", &req).await.json();
    let u = &v["usage"];
    assert_eq!(
        u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap(),
        n
    );
    assert_eq!(
        n as usize,
        rendered_len(json!([{"role": "user", "content": "hi"}]), true, None)
    );
    assert_eq!(v["content"][0]["type"], "thinking");
    assert_eq!(v["content"][1]["text"], "Hello there!");
    assert_eq!(v["stop_reason"], "end_turn");
}

#[tokio::test]
async fn responses_api_streaming_and_plain() {
    let s = start(ServerConfig::default()).await;
    let body = json!({"model": "deepseek-v4-flash", "instructions": "You are Codex.", "stream": true,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "tools": [{"type": "function", "name": "list_files", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}],
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files"}]}]});
    let r = post(s.addr, "/v1/responses", &body).await;
    assert_eq!(r.status, 200);
    let (events, _) = sse(&r.text());
    let data: Vec<Value> = events.iter().map(SseEvent::json).collect();
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["sequence_number"], i);
    }
    let types: Vec<&str> = data.iter().map(|d| d["type"].as_str().unwrap()).collect();
    assert_eq!(types[0], "response.created");
    assert_eq!(*types.last().unwrap(), "response.completed");
    assert!(types.contains(&"response.reasoning_summary_text.delta"));
    assert!(types.contains(&"response.output_text.delta"));
    let fc_done = data
        .iter()
        .find(|d| d["type"] == "response.function_call_arguments.done")
        .unwrap();
    assert_eq!(fc_done["name"], "list_files");
    let last = data.last().unwrap();
    let output = last["response"]["output"].as_array().unwrap();
    let kinds: Vec<&str> = output.iter().map(|o| o["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["reasoning", "message", "function_call"]);
    assert!(output[2]["call_id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(
        serde_json::from_str::<Value>(output[2]["arguments"].as_str().unwrap()).unwrap()["path"],
        "src & docs"
    );
    assert!(last["response"]["usage"]["input_tokens"].as_u64().unwrap() > 0);

    // Non-streaming, string input, reasoning effort none → no thinking.
    let v = post(
        s.addr,
        "/v1/responses",
        &json!({"input": "hi", "reasoning": {"effort": "none"}}),
    )
    .await
    .json();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["output"][0]["content"][0]["text"], "Hello there!");
    let r = post(
        s.addr,
        "/v1/responses",
        &json!({"input": "hi", "previous_response_id": "resp_1"}),
    )
    .await;
    assert_eq!(r.status, 400);
    // A Codex-style replay: reasoning item, function call, its output, hosted-tool items.
    let v = post(s.addr, "/v1/responses", &json!({"input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "please list files"}]},
        {"type": "reasoning", "summary": [], "encrypted_content": "opaque"},
        {"type": "function_call", "call_id": "call_1", "name": "list_files", "arguments": "{\"path\":\".\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "a.txt"},
        {"type": "local_shell_call", "call_id": "call_2", "action": {"command": ["ls"]}},
        {"type": "local_shell_call_output", "call_id": "call_2", "output": "b.txt"},
        {"type": "message", "role": "user", "content": "thanks"}]})).await;
    assert_eq!(v.status, 200, "{}", v.text());
    let r = post(
        s.addr,
        "/v1/responses",
        &json!({"input": [{"type": "bogus"}]}),
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn completions_stop_sequences_max_tokens_and_unicode() {
    let s = start(ServerConfig::default()).await;
    let v = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "stop test", "stop": ["STOP"], "model": "deepseek-chat"}),
    )
    .await
    .json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "alpha beta ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let v = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    // Anthropic stop_sequences → stop_reason stop_sequence.
    let v = post(
        s.addr,
        "/v1/messages",
        &json!({"max_tokens": 50, "thinking": {"type": "disabled"}, "stop_sequences": ["STOP"],
        "messages": [{"role": "user", "content": "stop test"}]}),
    )
    .await
    .json();
    assert_eq!(v["stop_reason"], "stop_sequence");
    assert_eq!(v["stop_sequence"], "STOP");
    // The byte codec splits characters across tokens; deltas never carry half a character.
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"stream": true, "messages": [{"role": "user", "content": "unicode"}]}),
    )
    .await;
    let (events, _) = sse(&r.text());
    let text: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            e.json()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "héllo ✓ 中文 🎉");
    assert!(!r.text().contains('\u{FFFD}'));
}

#[tokio::test]
async fn errors_have_each_apis_shape() {
    let s = start_with(
        ServerConfig {
            max_body_bytes: 1 << 20,
            ..ServerConfig::default()
        },
        4096,
    )
    .await;
    let bad = send_raw(
        s.addr,
        &request_bytes("POST", "/v1/chat/completions", &[], b"{not json"),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
    let bad = send_raw(
        s.addr,
        &request_bytes("POST", "/v1/messages", &[], b"[1,2]"),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["type"], "error");
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("temperature")
    );
    let r = post(s.addr, "/v1/chat/completions", &json!({"messages": []})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "messages");
    let r = post(
        s.addr,
        "/v1/messages",
        &json!({"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "banana"}),
    )
    .await;
    assert_eq!(r.status, 400);
    // Prompt longer than the context: both token counts.
    let long = "word ".repeat(1000);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(r.status, 400);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["n_ctx"], 4096);
    assert!(e["n_prompt_tokens"].as_u64().unwrap() > 5000);
    assert!(e["message"].as_str().unwrap().contains("4096"));
    let r = post(
        s.addr,
        "/v1/messages",
        &json!({"messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(r.json()["error"]["n_ctx"], 4096);
    assert_eq!(r.json()["type"], "error");
    // Body over the limit.
    let huge = vec![b'a'; (1 << 20) + 10];
    let r = send_raw(
        s.addr,
        &request_bytes("POST", "/v1/chat/completions", &[], &huge),
    )
    .await;
    assert_eq!(r.status, 413);
    // Still serving.
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn api_key_and_cors() {
    let s = start(ServerConfig {
        api_key: Some("sekret".into()),
        cors: true,
        ..ServerConfig::default()
    })
    .await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let r = post(s.addr, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = post(s.addr, "/v1/messages", &body).await;
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert_eq!(
        post_with(
            s.addr,
            "/v1/chat/completions",
            &body,
            &[("Authorization", "Bearer sekret")]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        post_with(s.addr, "/v1/messages", &body, &[("x-api-key", "sekret")])
            .await
            .status,
        200
    );
    assert_eq!(
        post_with(s.addr, "/v1/messages", &body, &[("x-api-key", "wrong")])
            .await
            .status,
        401
    );
    let r = send_raw(
        s.addr,
        &request_bytes("OPTIONS", "/v1/chat/completions", &[], b""),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(get(s.addr, "/health", &[]).await.status, 200);
}

#[tokio::test]
async fn keepalive_during_prefill_and_cancel_on_disconnect() {
    let config = ServerConfig {
        keepalive: Duration::from_millis(150),
        first_event_wait_ms: 50,
        ..ServerConfig::default()
    };
    let s = start(config).await;
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"stream": true, "messages": [{"role": "user", "content": "long prefill"}]}),
    )
    .await;
    let text = r.text();
    let first_data = text.find("data:").unwrap();
    assert!(
        text[..first_data].contains(":prefill") || text[..first_data].contains(": prefill"),
        "{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));

    // A slow stream (400 tokens × 25 ms = 10 s) abandoned after the first chunk must not
    // hold the worker: the next request completes quickly.
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let body = json!({"stream": true, "messages": [{"role": "user", "content": "slow please"}]})
        .to_string();
    sock.write_all(&request_bytes(
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    ))
    .await
    .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.read(&mut buf).await.unwrap();
    assert!(n > 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(sock);
    let t = Instant::now();
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "worker was still busy: {:?}",
        t.elapsed()
    );
    assert_eq!(s.state.worker.pending(), 0);
}
