//! The model-backed generator on a converted tiny oracle model: live-session reuse must
//! never change what is generated, only how much is prefilled.

use std::path::{Path, PathBuf};

use ds4_convert::{ConvertOptions, OutType, convert_hf};
use ds4_engine::live::{LoadedModel, ModelGenerator};
use ds4_engine::request::{
    CancelToken, Directive, GenerationEvent, GenerationRequest, SamplingParams,
};
use ds4_engine::worker::Generator;
use ds4_model::ForwardOptions;

fn tiny_model(tag: &str) -> LoadedModel {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-model/tiny-b/hf");
    let out: PathBuf =
        std::env::temp_dir().join(format!("ds4-engine-live-{tag}-{}.gguf", std::process::id()));
    convert_hf(
        &root,
        &out,
        &ConvertOptions {
            out_type: OutType::F16,
            name: None,
        },
    )
    .expect("convert tiny-b");
    let loaded = LoadedModel::load(&out, ForwardOptions::default()).expect("load tiny-b");
    // The mapping stays valid after unlinking the file.
    let _ = std::fs::remove_file(&out);
    loaded
}

fn greedy(tokens: Vec<u32>, max_tokens: u32) -> GenerationRequest {
    GenerationRequest {
        prompt_tokens: tokens,
        prompt_text: String::new(),
        sampling: SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: Some(1),
        },
        max_tokens,
        greedy_dsml: false,
        cancel: CancelToken::new(),
    }
}

/// Runs one request; returns (generated ids, cached prompt tokens, prefill events seen).
fn run(g: &mut ModelGenerator, req: &GenerationRequest) -> (Vec<u32>, u32, usize) {
    let mut ids = Vec::new();
    let mut prefill_events = 0;
    let mut emit = |ev: GenerationEvent| {
        match ev {
            GenerationEvent::Token { id, .. } => ids.push(id),
            GenerationEvent::Prefill { .. } => prefill_events += 1,
            _ => {}
        }
        Directive::Continue
    };
    let outcome = g.generate(req, &mut emit).expect("generate");
    assert_eq!(outcome.usage.completion_tokens as usize, ids.len());
    (ids, outcome.usage.cached_tokens, prefill_events)
}

#[test]
fn reuse_extend_and_rewind_match_fresh_sessions() {
    let loaded = tiny_model("reuse");
    let prompt: Vec<u32> = (0..57u32).map(|i| (i * 37 + 11) % 500 + 2).collect();

    // Turn 1 on a fresh generator.
    let mut live = ModelGenerator::new(&loaded, 256, 8).expect("generator");
    let (first, cached, prefill_events) = run(&mut live, &greedy(prompt.clone(), 12));
    assert_eq!(first.len(), 12);
    assert_eq!(cached, 0);
    assert!(
        prefill_events >= 6,
        "57 tokens in chunks of 8 report progress, got {prefill_events}"
    );

    // Turn 2 extends turn 1 (prompt + reply + new user text): only the new part is fed.
    let mut second_prompt = prompt.clone();
    second_prompt.extend(&first);
    second_prompt.extend([5, 6, 7, 8, 9]);
    let (second, cached, _) = run(&mut live, &greedy(second_prompt.clone(), 10));
    // The last sampled token of turn 1 was never fed (lazy feeding), everything before was.
    assert_eq!(
        cached as usize,
        prompt.len() + first.len() - 1,
        "turn 2 reused {cached} tokens"
    );
    let mut fresh = ModelGenerator::new(&loaded, 256, 8).expect("generator");
    let (second_fresh, _, _) = run(&mut fresh, &greedy(second_prompt.clone(), 10));
    assert_eq!(
        second, second_fresh,
        "reusing the live session changed the output"
    );

    // Turn 3 diverges inside turn 1's reply: the session rewinds to the common prefix.
    let mut third_prompt = prompt.clone();
    third_prompt.extend(&first[..4]);
    third_prompt.push(first[4] ^ 1);
    // That point lies before the last checkpoint, so the kept tokens are recomputed.
    let (third, cached, _) = run(&mut live, &greedy(third_prompt.clone(), 10));
    assert_eq!(cached, 0);
    let mut fresh = ModelGenerator::new(&loaded, 256, 8).expect("generator");
    let (third_fresh, _, _) = run(&mut fresh, &greedy(third_prompt.clone(), 10));
    assert_eq!(
        third, third_fresh,
        "rewinding the live session changed the output"
    );

    // Turn 4 re-renders the last prompt token differently (as thinking mode does with
    // `<think>`): the session restarts from the checkpoint taken before that token.
    let mut fourth_prompt = third_prompt.clone();
    let last = fourth_prompt.len() - 1;
    fourth_prompt[last] ^= 2;
    fourth_prompt.extend([11, 12, 13]);
    let (fourth, cached, _) = run(&mut live, &greedy(fourth_prompt.clone(), 10));
    assert_eq!(
        cached as usize, last,
        "the checkpoint before the last prompt token was not used"
    );
    let mut fresh4 = ModelGenerator::new(&loaded, 256, 8).expect("generator");
    let (fourth_fresh, _, _) = run(&mut fresh4, &greedy(fourth_prompt, 10));
    assert_eq!(
        fourth, fourth_fresh,
        "restoring the checkpoint changed the output"
    );

    // The same prompt again: nothing new to prefill but its last token.
    let (again, cached, _) = run(&mut fresh, &greedy(live.session_tokens().to_vec(), 3));
    assert_eq!(again.len(), 3);
    assert!(cached > 0);
}

#[test]
fn oversize_prompt_and_cancel_are_clean() {
    let loaded = tiny_model("edges");
    let mut g = ModelGenerator::new(&loaded, 32, 8).expect("generator");
    let Err(err) = g.generate(&greedy(vec![3; 40], 4), &mut |_| Directive::Continue) else {
        panic!("a 40-token prompt must not fit a 32-token context");
    };
    assert!(err.0.contains("40") && err.0.contains("32"), "{}", err.0);
    assert!(
        g.generate(&greedy(vec![], 4), &mut |_| Directive::Continue)
            .is_err()
    );

    let req = greedy(vec![3; 20], 30);
    req.cancel.cancel();
    let outcome = g
        .generate(&req, &mut |_| Directive::Continue)
        .expect("cancelled run");
    assert_eq!(outcome.usage.completion_tokens, 0);

    // Context full: generation ends with Length, not an error. Positions 30 and 31 are
    // fed; the token sampled from position 31's logits is emitted but never fed.
    let outcome = g
        .generate(&greedy(vec![3; 30], 100), &mut |_| Directive::Continue)
        .expect("run");
    assert!(outcome.usage.completion_tokens <= 3, "{:?}", outcome);
}
