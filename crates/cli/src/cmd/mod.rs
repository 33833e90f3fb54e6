//! One module per subcommand.
pub mod render_chat;
pub mod convert;
pub mod logits;
pub mod tokenize;
pub mod inspect;
pub mod serve;
pub mod selftest;
pub mod bench;
pub mod run;
pub mod chat;
