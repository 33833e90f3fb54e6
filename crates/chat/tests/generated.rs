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
