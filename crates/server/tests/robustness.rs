//! Robustness: 1,000 malformed or random requests (fuzzed JSON, wrong types, wrong
//! content types, truncated and oversized bodies, slow and vanishing clients, garbage
//! HTTP) plus 16 concurrent streaming clients. The server must answer every request
//! with a 4xx (never 5xx, never a crash), complete every valid request, and keep serving.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;
use ds4_server::ServerConfig;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn value(&mut self, depth: u32) -> Value {
        match self.below(if depth > 2 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => json!(self.next().is_multiple_of(2)),
            2 => json!((self.next() % 100_000) as f64 / 7.0 - 5000.0),
            3 => {
                let n = self.below(20);
                json!(String::from_utf8_lossy(&self.bytes(n)).into_owned())
            }
            4 => json!(-1),
            5 => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
            _ => {
                let mut m = serde_json::Map::new();
                for k in ["role", "content", "type", "text", "name", "x"] {
                    if self.next().is_multiple_of(2) {
                        m.insert(k.into(), self.value(depth + 1));
                    }
                }
                Value::Object(m)
            }
        }
    }
}

const PATHS: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/responses",
    "/v1/completions",
    "/v1/messages/count_tokens",
];

fn valid_body(path: &str, text: &str) -> Value {
    match path {
        "/v1/responses" => json!({"input": text, "max_output_tokens": 64}),
        "/v1/completions" => json!({"prompt": text, "max_tokens": 64}),
        _ => {
            json!({"model": "deepseek-v4-flash", "max_tokens": 64, "messages": [{"role": "user", "content": text}]})
        }
    }
}

/// Sends raw bytes; returns the status, or None if the server closed without a response.
async fn send_lenient(addr: std::net::SocketAddr, raw: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let _ = s.write_all(raw).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
    let line = buf.split(|&b| b == b'\n').next()?;
    String::from_utf8_lossy(line)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_bad_requests_and_sixteen_streams() {
    let s = start(ServerConfig {
        max_body_bytes: 256 << 10,
        ..ServerConfig::default()
    })
    .await;
    let addr = s.addr;
    let rss_before = vm_rss_kib();
    let started = Instant::now();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut jobs = Vec::new();
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..1000usize {
        let path = PATHS[rng.below(PATHS.len())];
        let kind = i % 10;
        let (raw, must_succeed) = match kind {
            0 => {
                let n = rng.below(400);
                (
                    request_bytes(
                        "POST",
                        path,
                        &[("Content-Type", "application/json")],
                        &rng.bytes(n),
                    ),
                    false,
                )
            }
            1 => {
                // A valid body with one field replaced by a random value.
                let mut body = valid_body(path, "hi");
                let keys: Vec<String> = body.as_object().unwrap().keys().cloned().collect();
                let k = keys[rng.below(keys.len())].clone();
                body[k.as_str()] = rng.value(0);
                (
                    request_bytes(
                        "POST",
                        path,
                        &[("Content-Type", "application/json")],
                        body.to_string().as_bytes(),
                    ),
                    false,
                )
            }
            2 => {
                let text = valid_body(path, "truncated").to_string();
                let cut = rng.below(text.len());
                (
                    request_bytes(
                        "POST",
                        path,
                        &[("Content-Type", "application/json")],
                        &text.as_bytes()[..cut],
                    ),
                    false,
                )
            }
            3 => {
                let ct = [
                    "text/plain",
                    "multipart/form-data; boundary=x",
                    "application/x-www-form-urlencoded",
                    "image/png",
                ][rng.below(4)];
                (
                    request_bytes(
                        "POST",
                        path,
                        &[("Content-Type", ct)],
                        valid_body(path, "hi").to_string().as_bytes(),
                    ),
                    false,
                )
            }
            4 => (
                request_bytes(
                    "POST",
                    path,
                    &[("Content-Type", "application/json")],
                    &vec![b'{'; 300 << 10],
                ),
                false,
            ),
            5 => {
                // Garbage HTTP.
                let n = rng.below(200);
                let mut raw = rng.bytes(n);
                raw.extend_from_slice(b"\r\n\r\n");
                (raw, false)
            }
            6 => {
                let m = ["GET", "PUT", "DELETE", "PATCH", "POST"][rng.below(5)];
                let p = format!(
                    "/v1/{}",
                    String::from_utf8_lossy(&rng.bytes(4))
                        .replace(|c: char| !c.is_ascii_alphanumeric(), "x")
                );
                (request_bytes(m, &p, &[], b""), false)
            }
            7 => {
                // Random messages array.
                let msgs: Vec<Value> = (0..rng.below(4)).map(|_| rng.value(1)).collect();
                let body =
                    json!({"messages": msgs, "input": msgs, "prompt": msgs, "max_tokens": 16});
                (
                    request_bytes(
                        "POST",
                        path,
                        &[("Content-Type", "application/json")],
                        body.to_string().as_bytes(),
                    ),
                    false,
                )
            }
            _ => (
                request_bytes(
                    "POST",
                    path,
                    &[("Content-Type", "application/json")],
                    valid_body(path, "hello").to_string().as_bytes(),
                ),
                true,
            ),
        };
        let slow = kind == 2 && i % 20 == 2;
        jobs.push(tokio::spawn(async move {
            if slow {
                // Slow client: dribble half the request, then vanish.
                let mut sock = TcpStream::connect(addr).await.unwrap();
                for b in raw.iter().take(raw.len() / 2) {
                    let _ = sock.write_all(&[*b]).await;
                    if *b == b'\n' {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                return (kind, None, must_succeed);
            }
            (kind, send_lenient(addr, &raw).await, must_succeed)
        }));
        if jobs.len() >= 16 {
            let j = jobs.remove(0);
            let (kind, status, must) = j.await.unwrap();
            check(kind, status, must);
            *by_status
                .entry(status.map_or("no response".into(), |c| c.to_string()))
                .or_default() += 1;
        }
    }
    for j in jobs {
        let (kind, status, must) = j.await.unwrap();
        check(kind, status, must);
        *by_status
            .entry(status.map_or("no response".into(), |c| c.to_string()))
            .or_default() += 1;
    }
    let bad_elapsed = started.elapsed();
    assert_eq!(by_status.values().sum::<usize>(), 1000);

    // 16 concurrent streaming clients across the three streaming APIs.
    let t = Instant::now();
    let mut streams = Vec::new();
    for i in 0..16 {
        streams.push(tokio::spawn(async move {
            let (path, body, terminal) = match i % 3 {
                0 => ("/v1/chat/completions", json!({"stream": true, "tools": [list_files_tool()], "messages": [{"role": "user", "content": format!("list files {i}")}]}), "[DONE]"),
                1 => ("/v1/messages", json!({"stream": true, "max_tokens": 300, "messages": [{"role": "user", "content": format!("list files {i}")}]}), "message_stop"),
                _ => ("/v1/responses", json!({"stream": true, "input": format!("hello {i}")}), "response.completed"),
            };
            let r = post(addr, path, &body).await;
            assert_eq!(r.status, 200);
            let text = r.text();
            assert!(text.contains(terminal), "stream {i} did not complete: {text}");
        }));
    }
    for st in streams {
        st.await.unwrap();
    }
    let stream_elapsed = t.elapsed();
    let r = get(addr, "/health", &[]).await;
    assert_eq!(r.json()["status"], "ok");
    assert_eq!(s.state.worker.pending(), 0);
    let rss_after = vm_rss_kib();
    eprintln!(
        "robustness: 1000 bad/random requests in {bad_elapsed:?} (responses by status: {by_status:?}); \
         16 concurrent streams in {stream_elapsed:?}; RSS {rss_before} KiB -> {rss_after} KiB"
    );
    assert!(
        rss_after < rss_before + 256 * 1024,
        "memory grew by more than 256 MiB"
    );
}

fn check(kind: usize, status: Option<u16>, must_succeed: bool) {
    if must_succeed {
        assert_eq!(
            status,
            Some(200),
            "valid request (kind {kind}) did not succeed"
        );
        return;
    }
    if let Some(code) = status {
        assert!(code < 500, "request kind {kind} got a server error {code}");
    }
}
