//! Shared test harness: an in-process server on an ephemeral port backed by the scripted
//! generator, and a minimal raw HTTP/1.1 client (so tests control every byte sent).
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use ds4_engine::request::TextCodec;
use ds4_engine::scripted::{ByteCodec, Script, ScriptedGenerator};
use ds4_engine::worker::WorkerHandle;
use ds4_server::{AppState, ServerConfig};

pub const D: &str = "｜DSML｜";

/// Scripted completions used by the tests. Rules match the latest user turn; in chat
/// (non-thinking) mode the turn ends with `<｜Assistant｜></think>`.
pub fn script_json(context: u32) -> String {
    let tool = format!(
        "The user wants files.</think>I will list them.\n\n<{D}tool_calls>\n<{D}invoke name=\"list_files\">\n<{D}parameter name=\"path\" string=\"true\">src & docs</{D}parameter>\n<{D}parameter name=\"depth\" string=\"false\">[1,  2]</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>"
    );
    serde_json::json!({
        "context": context,
        "rules": [
            {"match": "list files", "output": tool},
            {"match": "stream the tool slowly", "output": tool, "token_delay_ms": 4},
            {"match": "slow please", "output": "z".repeat(400), "token_delay_ms": 25},
            {"match": "long prefill", "output": "Thought.</think>Done.", "prefill_delay_ms": 900},
            {"match": "stop test", "output": "alpha beta STOP gamma"},
            {"match": "unicode", "output": "Ok.</think>héllo ✓ 中文 🎉"},
            {"match": "<｜Assistant｜></think>", "output": "Hello there!"}
        ],
        "default": {"output": "Let me think.</think>Hello there!"}
    })
    .to_string()
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn start(config: ServerConfig) -> TestServer {
    start_with(config, 32768).await
}

pub async fn start_with(config: ServerConfig, context: u32) -> TestServer {
    let script = Script::from_json(&script_json(context)).unwrap();
    let codec: Arc<dyn TextCodec> = Arc::new(ByteCodec);
    let worker =
        WorkerHandle::spawn(Box::new(ScriptedGenerator::new(script, Arc::clone(&codec)))).unwrap();
    let state = AppState::new(worker, codec, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let st = Arc::clone(&state);
    tokio::spawn(async move {
        ds4_server::serve(listener, st, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    TestServer {
        addr,
        state,
        _stop: tx,
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        body = &body[line_end + 2..];
        if size == 0 || body.len() < size {
            out.extend_from_slice(&body[..size.min(body.len())]);
            return out;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[(size + 2).min(body.len())..];
    }
}

pub fn parse_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {raw:?}"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// Sends raw bytes and reads the whole response (the request asks to close).
pub async fn send_raw(addr: SocketAddr, raw: &[u8]) -> HttpResponse {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    parse_response(&buf)
}

pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> HttpResponse {
    post_with(addr, path, body, &[]).await
}

pub async fn post_with(
    addr: SocketAddr,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    send_raw(
        addr,
        &request_bytes("POST", path, &h, body.to_string().as_bytes()),
    )
    .await
}

pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    send_raw(addr, &request_bytes("GET", path, headers, b"")).await
}

/// One SSE event: optional `event:` name, the `data:` payload, and comments before it.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("bad SSE JSON ({e}): {}", self.data))
    }
}

/// Parses an SSE body into events; comment lines are returned separately.
pub fn sse(body: &str) -> (Vec<SseEvent>, Vec<String>) {
    let mut events = Vec::new();
    let mut comments = Vec::new();
    for block in body.split("\n\n") {
        let mut event = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if let Some(c) = line.strip_prefix(':') {
                comments.push(c.trim().to_string());
            } else if let Some(e) = line.strip_prefix("event:") {
                event = Some(e.trim().to_string());
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push(d.strip_prefix(' ').unwrap_or(d));
            }
        }
        if !data.is_empty() {
            events.push(SseEvent {
                event,
                data: data.join("\n"),
            });
        }
    }
    (events, comments)
}

/// The tool definition used by the tool tests (OpenAI form).
pub fn list_files_tool() -> Value {
    serde_json::json!({"type": "function", "function": {"name": "list_files", "description": "List files",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "depth": {"type": "array"}}, "required": ["path"]}}})
}
