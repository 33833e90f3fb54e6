//! `ds4 render-chat` on the official gold inputs and the generated conversations:
//! stdout must be the official encoder's bytes, nothing else.

#![allow(clippy::unwrap_used)]
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/chat")
}

fn render_file(path: &std::path::Path) -> Vec<u8> {
    let out = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .arg("render-chat")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn renders_official_gold_inputs() {
    for i in 1..=4 {
        let dir = fixtures().join("official");
        let got = render_file(&dir.join(format!("request_{i}.json")));
        let want = std::fs::read(dir.join(format!("test_output_{i}.txt"))).unwrap();
        assert_eq!(got, want, "gold vector {i}");
    }
}

#[test]
fn renders_generated_conversations() {
    let dir = fixtures().join("generated");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let want = std::fs::read(path.with_extension("txt")).unwrap();
            assert_eq!(render_file(&path), want, "{}", path.display());
            n += 1;
        }
    }
    assert!(n >= 30);
}

#[test]
fn reads_stdin_with_dash() {
    let dir = fixtures().join("official");
    let input = std::fs::read(dir.join("request_2.json")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(["render-chat", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        out.stdout,
        std::fs::read(dir.join("test_output_2.txt")).unwrap()
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(["render-chat", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"messages":[{"role":"wizard","content":"x"}]}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wizard"));
}
