//! `ds4 tokenize` against the HF-oracle ids of server.md §1.8 (fixtures/vocab GGUF).

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};

fn vocab() -> String {
    format!(
        "{}/../../fixtures/vocab/deepseek-v4.gguf",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn tokenize(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .arg("tokenize")
        .arg("-m")
        .arg(vocab())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn text_argument() {
    assert_eq!(
        tokenize(&["    int x = 12345;\n"], None),
        "[361,688,1527,438,223,6895,1883,510]\n"
    );
}

#[test]
fn stdin_with_and_without_specials() {
    let prompt = "<｜begin▁of▁sentence｜><｜User｜>Rispondi in italiano con una frase: chi era Ada Lovelace?<｜Assistant｜></think>";
    assert_eq!(
        tokenize(&["--specials", "-"], Some(prompt)),
        "[0,128803,52,278,4908,75,295,89034,399,3919,123003,28,23442,9861,63030,47121,317,805,33,128804,128822]\n"
    );
    assert_eq!(
        tokenize(&[], Some("</｜DSML｜parameter>")),
        "[1718,28217,10525,7398,28217,41523,32]\n"
    );
    assert_eq!(
        tokenize(&["--specials"], Some("</｜DSML｜parameter>")),
        "[1718,128825,41523,32]\n"
    );
}

#[test]
fn missing_file_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(["tokenize", "-m", "/nonexistent.gguf", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonexistent"));
}
