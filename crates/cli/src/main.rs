//! `ds4`: one binary, one subcommand per job. Each subcommand lives in
//! `cmd/<name>.rs` with its own `Args` (clap) and `run(args)`.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ds4", version, about = "DeepSeek V4 Flash inference engine", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    }
}
