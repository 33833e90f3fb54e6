//! `ds4`: one binary, one subcommand per job. Each subcommand lives in
//! `cmd/<name>.rs` with its own `Args` (clap) and `run(args)`.

mod cmd;
mod parity;
mod plot;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ds4", version, about = "DeepSeek V4 Flash inference engine", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt, streamed (reasoning dimmed, then the answer).
    Run(cmd::run::Args),
    /// Interactive multi-turn chat that keeps the KV state between turns.
    Chat(cmd::chat::Args),
    /// Convert a Hugging Face DeepseekV4 checkpoint to a ds4 Flash GGUF.
    Convert(cmd::convert::Args),
    /// Render a chat request (official DeepSeek V4 encoder) to the prompt text on stdout.
    RenderChat(cmd::render_chat::Args),
    /// Token ids of a text as a JSON array (vocabulary from a GGUF file).
    Tokenize(cmd::tokenize::Args),
    /// Logits of every position of a token sequence (little-endian f32 [n × vocab]).
    Logits(cmd::logits::Args),
    /// Show a GGUF file's header, metadata and tensors; validate deepseek4 files.
    Inspect(cmd::inspect::Args),
    /// OpenAI- and Anthropic-compatible HTTP server.
    Serve(cmd::serve::Args),
    /// GPU-vs-CPU parity checks of every CUDA kernel (named tolerances).
    Selftest(cmd::selftest::Args),
    /// Prefill/decode tokens/s: a model file (`-m`, GPU or CPU) or the synthetic Flash model on the GPU.
    Bench(cmd::bench::Args),
    /// GPU memory plan for a model and context: what goes where, does it fit.
    Plan(cmd::plan::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => cmd::run::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::Convert(args) => cmd::convert::run(args),
        Command::RenderChat(args) => cmd::render_chat::run(args),
        Command::Tokenize(args) => cmd::tokenize::run(args),
        Command::Logits(args) => cmd::logits::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Selftest(args) => cmd::selftest::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Plan(args) => cmd::plan::run(args),
    }
}
