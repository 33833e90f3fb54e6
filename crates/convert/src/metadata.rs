//! The GGUF metadata of a ds4 Flash file (model.md §4.2), with the value types ds4's
//! strict getters accept.

use crate::config::ModelConfig;
use crate::vocab::Vocab;

/// A metadata value before it is handed to the GGUF writer.
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    U32(u32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    U32s(Vec<u32>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
    Strs(Vec<String>),
}

impl Meta {
    pub fn into_gguf(self) -> ds4_gguf::Value {
        use ds4_gguf::Value;
        let array = |items: Vec<Value>, item_type| Value::Array { item_type, items };
        match self {
            Meta::U32(v) => Value::U32(v),
            Meta::U64(v) => Value::U64(v),
            Meta::F32(v) => Value::F32(v),
            Meta::Bool(v) => Value::Bool(v),
            Meta::Str(v) => Value::String(v),
            Meta::U32s(v) => array(
                v.into_iter().map(Value::U32).collect(),
                ds4_gguf::ValueType::U32,
            ),
            Meta::I32s(v) => array(
                v.into_iter().map(Value::I32).collect(),
                ds4_gguf::ValueType::I32,
            ),
            Meta::F32s(v) => array(
                v.into_iter().map(Value::F32).collect(),
                ds4_gguf::ValueType::F32,
            ),
            Meta::Strs(v) => array(
                v.into_iter().map(Value::String).collect(),
                ds4_gguf::ValueType::String,
            ),
        }
    }
}

/// All metadata records, in file order.
pub fn metadata(cfg: &ModelConfig, vocab: &Vocab, name: &str) -> Vec<(String, Meta)> {
    use Meta::*;
    let mut kv: Vec<(String, Meta)> = Vec::new();
    let mut put = |key: &str, v: Meta| kv.push((key.to_string(), v));
    put("general.architecture", Str("deepseek4".into()));
    put("general.name", Str(name.to_string()));
    put("general.alignment", U32(32));

    let a = "deepseek4";
    let key = |s: &str| format!("{a}.{s}");
    let mut put_a = |s: &str, v: Meta| put(&key(s), v);
    put_a("context_length", U64(cfg.context_length));
    put_a("block_count", U32(cfg.n_layer));
    put_a("embedding_length", U32(cfg.n_embd));
    put_a("vocab_size", U32(cfg.vocab_size));
    put_a("attention.head_count", U32(cfg.n_head));
    put_a("attention.head_count_kv", U32(cfg.n_head_kv));
    put_a("attention.key_length", U32(cfg.head_dim));
    put_a("attention.value_length", U32(cfg.head_dim));
    put_a("rope.dimension_count", U32(cfg.n_rot));
    put_a("attention.q_lora_rank", U32(cfg.q_lora_rank));
    put_a("attention.output_lora_rank", U32(cfg.o_lora_rank));
    put_a("attention.output_group_count", U32(cfg.o_groups));
    put_a("expert_count", U32(cfg.n_expert));
    put_a("expert_used_count", U32(cfg.n_expert_used));
    put_a("expert_feed_forward_length", U32(cfg.expert_ffn));
    put_a("expert_shared_count", U32(cfg.n_expert_shared));
    put_a("expert_group_count", U32(0));
    put_a("expert_group_used_count", U32(0));
    put_a("hash_layer_count", U32(cfg.hash_layer_count));
    put_a("expert_weights_scale", F32(cfg.routed_scale));
    put_a("expert_weights_norm", Bool(cfg.norm_topk_prob));
    put_a(
        "swiglu_clamp_exp",
        F32s(vec![cfg.swiglu_limit; cfg.n_layer as usize]),
    );
    put_a("attention.sliding_window", U32(cfg.sliding_window));
    put_a(
        "attention.compress_ratios",
        U32s(cfg.compress_ratios.clone()),
    );
    put_a("attention.indexer.head_count", U32(cfg.index_n_heads));
    put_a("attention.indexer.key_length", U32(cfg.index_head_dim));
    put_a("attention.indexer.top_k", U32(cfg.index_topk));
    put_a("hyper_connection.count", U32(cfg.hc_mult));
    put_a(
        "hyper_connection.sinkhorn_iterations",
        U32(cfg.hc_sinkhorn_iters),
    );
    put_a("hyper_connection.epsilon", F32(cfg.hc_eps));
    put_a("attention.layer_norm_rms_epsilon", F32(cfg.rms_eps));
    put_a("rope.freq_base", F32(cfg.rope_theta));
    put_a(
        "attention.compress_rope_freq_base",
        F32(cfg.compress_rope_theta),
    );
    put_a("rope.scaling.type", Str("yarn".into()));
    put_a("rope.scaling.factor", F32(cfg.yarn_factor));
    put_a(
        "rope.scaling.original_context_length",
        U32(cfg.yarn_original_ctx),
    );
    put_a("rope.scaling.yarn_beta_fast", F32(cfg.yarn_beta_fast));
    put_a("rope.scaling.yarn_beta_slow", F32(cfg.yarn_beta_slow));

    put("tokenizer.ggml.model", Str("gpt2".into()));
    put("tokenizer.ggml.pre", Str("joyai-llm".into()));
    put("tokenizer.ggml.tokens", Strs(vocab.tokens.clone()));
    put("tokenizer.ggml.token_type", I32s(vocab.token_types.clone()));
    put("tokenizer.ggml.merges", Strs(vocab.merges.clone()));
    put("tokenizer.ggml.bos_token_id", U32(vocab.bos));
    put("tokenizer.ggml.eos_token_id", U32(vocab.eos));
    put("tokenizer.ggml.add_bos_token", Bool(true));
    put("tokenizer.ggml.add_eos_token", Bool(false));
    kv
}
