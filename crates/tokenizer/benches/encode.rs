//! English text encode throughput on one core (target ≥ 5 MB/s).

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ds4_gguf::GgufFile;
use ds4_tokenizer::Tokenizer;

fn bench_encode(c: &mut Criterion) {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let file = GgufFile::open(fixtures.join("vocab/deepseek-v4.gguf")).expect("vocab gguf");
    let tok = Tokenizer::from_gguf(&file).expect("tokenizer");
    let text =
        std::fs::read_to_string(fixtures.join("tokenizer/bench_english.txt")).expect("bench text");
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.sample_size(10);
    g.bench_function("english_plain", |b| {
        b.iter(|| tok.encode(black_box(&text), false).expect("encode"))
    });
    g.bench_function("english_chat_specials", |b| {
        b.iter(|| tok.encode(black_box(&text), true).expect("encode"))
    });
    g.finish();
}

criterion_group!(benches, bench_encode);
criterion_main!(benches);
