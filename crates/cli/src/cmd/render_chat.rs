//! `ds4 render-chat [FILE|-]`: renders a chat request exactly like DeepSeek's official
//! encoder and writes the prompt bytes to stdout (nothing else).

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;

/// Render a conversation to the exact prompt text the model sees.
///
/// Input JSON: `{"thinking_mode": "chat"|"thinking", "reasoning_effort": null|"high"|"max",
/// "messages": [...]}` with OpenAI-format messages; tools sit inside a system or developer
/// message (`"tools": [...]`) as in the official test inputs (top-level `tools` are put on
/// a leading system message).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Request JSON file; `-` or nothing reads stdin.
    pub input: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = match args.input.as_deref() {
        None => read_stdin()?,
        Some(p) if p.as_os_str() == "-" => read_stdin()?,
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
    };
    let request = ds4_chat::ChatRequest::from_json(&text)?;
    let prompt = ds4_chat::render(&request)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(prompt.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading stdin")?;
    Ok(text)
}
