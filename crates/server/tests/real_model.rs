//! The server over the real model-backed engine: the committed tiny model
//! (`fixtures/models/tiny-b-q8_0.gguf`) answers over HTTP, usage counts are the real
//! tokenizer's, and a follow-up turn reuses the live session instead of re-prefilling.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use common::post;
use ds4_engine::live::{LoadedModel, ModelGenerator, TokenizerCodec};
use ds4_engine::request::TextCodec;
use ds4_engine::worker::WorkerHandle;
use ds4_model::ForwardOptions;
use ds4_server::{AppState, ServerConfig};

#[tokio::test]
async fn tiny_model_answers_and_reuses_its_session() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny-b-q8_0.gguf");
    let loaded = LoadedModel::load(&path, ForwardOptions::default()).unwrap();
    let tokenizer = Arc::clone(&loaded.tokenizer);
    let generator = ModelGenerator::new(&loaded, 1024, 64).unwrap();
    let codec: Arc<dyn TextCodec> = Arc::new(TokenizerCodec(Arc::clone(&tokenizer)));
    let worker = WorkerHandle::spawn(Box::new(generator)).unwrap();
    let state = AppState::new(worker, codec, ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(ds4_server::serve(
        listener,
        state,
        std::future::pending::<()>(),
    ));

    let messages = json!([{"role": "user", "content": "Write a haiku about caches."}]);
    let body =
        json!({"model": "deepseek-chat", "messages": messages, "max_tokens": 6, "temperature": 0});
    let r = post(addr, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let request: ds4_chat::ChatRequest = serde_json::from_value(json!({
        "thinking_mode": "chat", "messages": messages
    }))
    .unwrap();
    let prompt = ds4_chat::render(&request).unwrap();
    let prompt_tokens = tokenizer.encode(&prompt, true).unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens, "{v}");
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=6).contains(&completion), "{v}");
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    // Same request again (greedy): same answer, and the live session serves the prompt.
    let r2 = post(addr, "/v1/chat/completions", &body).await;
    let v2 = r2.json();
    assert_eq!(
        v2["choices"][0]["message"]["content"],
        answer.as_str(),
        "{v2}"
    );
    let cached = v2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached + 1 >= prompt_tokens as u64,
        "only {cached} of {prompt_tokens} prompt tokens reused: {v2}"
    );

    // A follow-up turn extends the conversation: its history is not prefilled again (at
    // least the first prompt up to its last token, where the prompt checkpoint sits; the
    // sampled reply may tokenize differently when re-rendered as text).
    let follow = json!({"model": "deepseek-chat", "max_tokens": 4, "temperature": 0, "messages": [
        {"role": "user", "content": "Write a haiku about caches."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Shorter."}
    ]});
    let r3 = post(addr, "/v1/chat/completions", &follow).await;
    assert_eq!(r3.status, 200, "{}", r3.text());
    let v3 = r3.json();
    let cached = v3["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached + 1 >= prompt_tokens as u64,
        "follow-up reused only {cached} tokens: {v3}"
    );

    // Streaming works over the same engine and ends with [DONE].
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let r4 = post(addr, "/v1/chat/completions", &stream_body).await;
    assert_eq!(r4.status, 200);
    let text = r4.text();
    assert!(
        text.contains("chat.completion.chunk") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );
}
