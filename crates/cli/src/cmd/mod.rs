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
