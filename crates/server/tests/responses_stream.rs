//! Responses API (`POST /v1/responses`): function calls stream live while the DSML
//! invocation is generated (spec server.md §5.10, §5.12), over real HTTP against the
//! scripted generator (whose `list files` rule emits one DSML tool call).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;
use ds4_server::ServerConfig;

fn request(text: &str, stream: bool) -> Value {
    json!({"model": "deepseek-v4-flash", "stream": stream,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "tools": [{"type": "function", "name": "list_files", "description": "List files",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "depth": {"type": "array"}}}}],
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]})
}

/// Event types with runs of the same delta type collapsed to one entry.
fn collapsed_types(events: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events {
        let t = e["type"].as_str().unwrap().to_string();
        if t.ends_with(".delta") && out.last() == Some(&t) {
            continue;
        }
        out.push(t);
    }
    out
}

#[tokio::test]
async fn streamed_function_call_has_the_full_live_lifecycle() {
    let s = start(ServerConfig::default()).await;
    let r = post(s.addr, "/v1/responses", &request("please list files", true)).await;
    assert_eq!(r.status, 200);
    let (events, _) = sse(&r.text());
    let data: Vec<Value> = events.iter().map(SseEvent::json).collect();
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["sequence_number"], i, "{d}");
    }
    // The server may also send `response.in_progress`; everything else is fixed.
    let types: Vec<String> = collapsed_types(&data)
        .into_iter()
        .filter(|t| t != "response.in_progress")
        .collect();
    assert_eq!(
        types,
        vec![
            "response.created",
            "response.output_item.added",
            "response.reasoning_summary_part.added",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.done",
            "response.reasoning_summary_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );

    let added = data
        .iter()
        .find(|d| d["type"] == "response.output_item.added" && d["item"]["type"] == "function_call")
        .unwrap();
    assert_eq!(added["output_index"], 2);
    let item = &added["item"];
    assert_eq!(item["status"], "in_progress");
    assert_eq!(item["name"], "list_files");
    assert_eq!(item["arguments"], "");
    let item_id = item["id"].as_str().unwrap();
    assert!(
        item_id.starts_with("fc_") && item_id.len() == 27,
        "{item_id}"
    );
    let call_id = item["call_id"].as_str().unwrap();
    assert!(
        call_id.starts_with("call_") && call_id.len() == 37,
        "{call_id}"
    );

    let deltas: Vec<&Value> = data
        .iter()
        .filter(|d| d["type"] == "response.function_call_arguments.delta")
        .collect();
    // Fragments as the DSML arrives, not one complete string: `{`, each key, values, `}`.
    assert!(deltas.len() >= 4, "{deltas:?}");
    assert_eq!(deltas[0]["delta"], "{");
    let mut streamed = String::new();
    for d in &deltas {
        assert_eq!(d["item_id"], item_id);
        assert_eq!(d["output_index"], 2);
        streamed.push_str(d["delta"].as_str().unwrap());
    }
    let args_done = data
        .iter()
        .find(|d| d["type"] == "response.function_call_arguments.done")
        .unwrap();
    assert_eq!(args_done["item_id"], item_id);
    assert_eq!(args_done["output_index"], 2);
    assert_eq!(args_done["name"], "list_files");
    assert_eq!(args_done["arguments"], streamed.as_str());
    let parsed: Value = serde_json::from_str(&streamed).unwrap();
    assert_eq!(parsed, json!({"path": "src & docs", "depth": [1, 2]}));

    let item_done: Vec<&Value> = data
        .iter()
        .filter(|d| d["type"] == "response.output_item.done")
        .collect();
    assert_eq!(item_done.len(), 3);
    for (i, d) in item_done.iter().enumerate() {
        assert_eq!(d["output_index"], i);
    }
    let fc = &item_done[2]["item"];
    assert_eq!(fc["id"], item_id);
    assert_eq!(fc["type"], "function_call");
    assert_eq!(fc["status"], "completed");
    assert_eq!(fc["call_id"], call_id);
    assert_eq!(fc["name"], "list_files");
    assert_eq!(fc["arguments"], streamed.as_str());

    // The text item is the one opened earlier, with the text streamed before the block.
    let msg_added = data
        .iter()
        .find(|d| d["type"] == "response.output_item.added" && d["item"]["type"] == "message")
        .unwrap();
    assert_eq!(msg_added["output_index"], 1);
    assert_eq!(item_done[1]["item"]["id"], msg_added["item"]["id"]);
    assert_eq!(
        item_done[1]["item"]["content"][0]["text"],
        "I will list them."
    );

    // The terminal event carries exactly the items that were completed on the stream.
    let last = data.last().unwrap();
    assert_eq!(last["response"]["status"], "completed");
    let output = last["response"]["output"].as_array().unwrap();
    let done_items: Vec<Value> = item_done.iter().map(|d| d["item"].clone()).collect();
    assert_eq!(output, &done_items);
    assert!(last["response"]["usage"]["input_tokens"].as_u64().unwrap() > 0);
}

/// Reads a streamed response from the socket, noting when each marker first arrived.
async fn arrival_times(addr: std::net::SocketAddr, body: &Value, markers: &[&str]) -> Vec<Instant> {
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(&request_bytes(
        "POST",
        "/v1/responses",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    ))
    .await
    .unwrap();
    let mut seen: Vec<Option<Instant>> = vec![None; markers.len()];
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let n = tokio::time::timeout(Duration::from_secs(30), sock.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        let now = Instant::now();
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        for (slot, marker) in seen.iter_mut().zip(markers) {
            if slot.is_none() && text.contains(marker) {
                *slot = Some(now);
            }
        }
    }
    let text = String::from_utf8_lossy(&raw);
    seen.into_iter()
        .zip(markers)
        .map(|(t, m)| t.unwrap_or_else(|| panic!("{m} never arrived: {text}")))
        .collect()
}

#[tokio::test]
async fn first_argument_delta_arrives_before_the_invoke_ends() {
    let s = start(ServerConfig::default()).await;
    // Same DSML as `list files`, one byte-token every 4 ms. From the invoke tag's end to
    // `</｜DSML｜invoke>` there are well over 150 tokens (≥ 600 ms).
    let times = arrival_times(
        s.addr,
        &request("stream the tool slowly", true),
        &[
            "\"response.function_call_arguments.delta\"",
            "\"response.function_call_arguments.done\"",
            "\"response.completed\"",
        ],
    )
    .await;
    let gap = times[1].duration_since(times[0]);
    assert!(
        gap >= Duration::from_millis(300),
        "arguments were not streamed live: first delta only {gap:?} before the end"
    );
    assert!(times[2] >= times[1]);
}

#[tokio::test]
async fn non_streaming_function_call_is_unchanged() {
    let s = start(ServerConfig::default()).await;
    let v = post(
        s.addr,
        "/v1/responses",
        &request("please list files", false),
    )
    .await
    .json();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    let output = v["output"].as_array().unwrap();
    let kinds: Vec<&str> = output.iter().map(|o| o["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["reasoning", "message", "function_call"]);
    assert_eq!(output[0]["summary"][0]["text"], "The user wants files.");
    assert_eq!(output[1]["content"][0]["text"], "I will list them.");
    let fc = &output[2];
    assert_eq!(fc["status"], "completed");
    assert_eq!(fc["name"], "list_files");
    assert!(fc["id"].as_str().unwrap().starts_with("fc_"));
    assert!(fc["call_id"].as_str().unwrap().starts_with("call_"));
    // Complete compact JSON from the final parse (raw values minified).
    assert_eq!(fc["arguments"], r#"{"path":"src & docs","depth":[1,2]}"#);
}
