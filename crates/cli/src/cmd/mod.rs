//! One module per subcommand.
pub mod bench;
pub mod chat;
pub mod convert;
pub mod inspect;
pub mod logits;
pub mod plan;
pub mod render_chat;
pub mod run;
pub mod selftest;
pub mod serve;
pub mod tokenize;

/// `--backend auto|cpu|cuda` (clap restricts the values).
pub fn backend_pref(name: &str) -> ds4_engine::live::BackendPref {
    match name {
        "cpu" => ds4_engine::live::BackendPref::Cpu,
        "cuda" => ds4_engine::live::BackendPref::Cuda,
        _ => ds4_engine::live::BackendPref::Auto,
    }
}
