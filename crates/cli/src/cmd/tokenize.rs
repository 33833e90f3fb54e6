//! `ds4 tokenize -m FILE [--specials] [TEXT|-]`: token ids of a text as a JSON array.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;

/// Tokenize text with the vocabulary of a GGUF file (only its metadata is read).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF file (a model or a vocab-only file).
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Recognise the ds4 chat special strings (BOS, EOS, <｜User｜>, <｜Assistant｜>,
    /// <think>, </think>, ｜DSML｜) instead of treating everything as plain text.
    #[arg(long)]
    pub specials: bool,
    /// Text to tokenize; `-` or nothing reads stdin.
    pub text: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = match args.text {
        None => read_stdin()?,
        Some(t) if t == "-" => read_stdin()?,
        Some(t) => t,
    };
    let file = ds4_gguf::GgufFile::open(&args.model)
        .with_context(|| format!("opening {}", args.model.display()))?;
    let tokenizer = ds4_tokenizer::Tokenizer::from_gguf(&file)
        .with_context(|| format!("loading the vocabulary of {}", args.model.display()))?;
    let ids = tokenizer.encode(&text, args.specials)?;
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &ids)?;
    writeln!(stdout)?;
    stdout.flush()?;
    Ok(())
}

fn read_stdin() -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("reading stdin")?;
    String::from_utf8(bytes).context("stdin is not valid UTF-8")
}
