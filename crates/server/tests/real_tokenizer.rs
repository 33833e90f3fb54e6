//! Usage counts with the real V4 tokenizer (vocabulary fixture), checked against the
//! token count the spec gives for a worked example (server.md §2.9: 20 tokens).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use serde_json::json;

use common::*;
use ds4_engine::request::TextCodec;
use ds4_engine::scripted::{Script, ScriptedGenerator};
use ds4_engine::worker::WorkerHandle;
use ds4_server::{AppState, ServerConfig};

struct Vocab(ds4_tokenizer::Tokenizer);

impl TextCodec for Vocab {
    fn encode_rendered(&self, text: &str) -> Vec<u32> {
        self.0.encode(text, true).unwrap()
    }
    fn decode_token(&self, id: u32) -> Vec<u8> {
        self.0.token_bytes(id).to_vec()
    }
    fn name(&self) -> &str {
        "deepseek-v4"
    }
}

#[tokio::test]
async fn prompt_and_completion_counts_are_real_token_counts() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/vocab/deepseek-v4.gguf"
    );
    let file = ds4_gguf::GgufFile::open(path).unwrap();
    let codec: Arc<dyn TextCodec> =
        Arc::new(Vocab(ds4_tokenizer::Tokenizer::from_gguf(&file).unwrap()));
    let script = Script::from_json(&script_json(32768)).unwrap();
    let worker =
        WorkerHandle::spawn(Box::new(ScriptedGenerator::new(script, Arc::clone(&codec)))).unwrap();
    let state = AppState::new(worker, Arc::clone(&codec), ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(ds4_server::serve(listener, state, std::future::pending()));

    let messages = json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "greet", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]);
    let v = post(addr, "/v1/chat/completions", &json!({"messages": messages}))
        .await
        .json();
    assert_eq!(v["usage"]["prompt_tokens"], 20, "{v}");
    // "Let me think.</think>Hello there!" — </think> is one token.
    let expected = codec
        .encode_rendered("Let me think.</think>Hello there!")
        .len();
    assert_eq!(v["usage"]["completion_tokens"], expected);
    assert_eq!(v["choices"][0]["message"]["content"], "Hello there!");
    assert_eq!(
        v["choices"][0]["message"]["reasoning_content"],
        "Let me think."
    );
    // count_tokens agrees.
    let n = post(addr, "/v1/messages/count_tokens", &json!({"system": "You are terse.", "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "greet", "signature": "x"}, {"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": "2+2?"}]})).await.json();
    assert_eq!(n["input_tokens"], 20);
}
