//! `ds4 chat`: interactive multi-turn chat that keeps the live KV state between turns
//! (each turn only prefills what is new since the last one).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use ds4_chat::{ReasoningEffort, ThinkingMode};
use ds4_engine::request::CancelToken;
use rustyline::error::ReadlineError;

use crate::cmd::run::{Chat, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: ModelArgs,
}

const HELP: &str = "commands: /think  /think-max  /nothink  /ctx N (new session, KV lost)  /read FILE (file as the next message)  /help  /quit";

/// Ctrl-C while generating stops the generation (at the prompt, the line editor handles it).
#[derive(Clone)]
pub struct CtrlC {
    armed: Arc<Mutex<Option<CancelToken>>>,
}

impl CtrlC {
    /// Installs the SIGINT handler (a background thread); call once.
    pub fn install() -> anyhow::Result<Self> {
        let armed: Arc<Mutex<Option<CancelToken>>> = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&armed);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the signal handler")?;
        std::thread::Builder::new()
            .name("ds4-ctrl-c".into())
            .spawn(move || {
                runtime.block_on(async move {
                    while tokio::signal::ctrl_c().await.is_ok() {
                        match slot.lock().ok().and_then(|g| g.clone()) {
                            Some(token) => token.cancel(),
                            None => std::process::exit(130),
                        }
                    }
                })
            })
            .context("starting the signal handler thread")?;
        Ok(Self { armed })
    }

    /// From now on, Ctrl-C cancels `token`.
    pub fn arm(&self, token: &CancelToken) {
        if let Ok(mut g) = self.armed.lock() {
            *g = Some(token.clone());
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut chat = Chat::open(args.common)?;
    let ctrl_c = CtrlC::install()?;
    let mut editor = rustyline::DefaultEditor::new().context("starting the line editor")?;
    let history: Option<PathBuf> =
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ds4_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    eprintln!("{HELP}");
    let mut pending_file: Option<String> = None;
    loop {
        let line = match editor.readline("ds4> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("reading input"),
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(text);
        if let Some(cmd) = text.strip_prefix('/') {
            let (name, arg) = cmd
                .split_once(' ')
                .map_or((cmd, ""), |(a, b)| (a, b.trim()));
            match name {
                "quit" | "exit" => break,
                "help" => eprintln!("{HELP}"),
                "think" => {
                    chat.thinking = ThinkingMode::Thinking;
                    chat.effort = None;
                    eprintln!("thinking on");
                }
                "think-max" => {
                    chat.thinking = ThinkingMode::Thinking;
                    chat.effort = Some(ReasoningEffort::Max);
                    eprintln!("thinking on, maximum effort");
                }
                "nothink" => {
                    chat.thinking = ThinkingMode::Chat;
                    chat.effort = None;
                    eprintln!("thinking off");
                }
                "ctx" => match arg.parse::<usize>() {
                    Ok(n) if n > 0 => match chat.reset_session(n) {
                        Ok(()) => eprintln!("new session with a context of {n} tokens"),
                        Err(e) => eprintln!("error: {e:#}"),
                    },
                    _ => eprintln!("usage: /ctx N (tokens, > 0)"),
                },
                "read" => match std::fs::read_to_string(arg) {
                    Ok(content) => {
                        eprintln!(
                            "read {} bytes from {arg}; it is sent with your next message",
                            content.len()
                        );
                        pending_file = Some(content);
                    }
                    Err(e) => eprintln!("cannot read {arg}: {e}"),
                },
                _ => eprintln!("unknown command /{name}; {HELP}"),
            }
            continue;
        }
        let message = match pending_file.take() {
            Some(file) => format!("{file}\n\n{text}"),
            None => text.to_string(),
        };
        let cancel = CancelToken::new();
        ctrl_c.arm(&cancel);
        match chat.turn(&message, &cancel) {
            Ok(true) => eprintln!("(interrupted)"),
            Ok(false) => {}
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}
