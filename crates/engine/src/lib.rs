//! ds4-engine: sessions, the generation loop and the inference worker.

pub mod live;
pub mod request;
pub mod scripted;
pub mod worker;
