//! CPU forward throughput on the tiny oracle models (report only).
//! `cargo bench -p ds4-cpu --bench forward`
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ds4_cpu::CpuBackend;
use ds4_model::{ForwardOptions, Model, Session};

fn bench(c: &mut Criterion) {
    for name in ["tiny-a", "tiny-b"] {
        let (shape, tensors) = common::load_gguf(name);
        let (tokens, _) = common::load_seq(name, "text");
        let model = Model::new(
            CpuBackend::new(&shape),
            shape.clone(),
            &tensors,
            ForwardOptions::default(),
        )
        .unwrap();
        let n = tokens.len();
        let mut g = c.benchmark_group(name);
        g.sample_size(10);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("prefill {n} tokens, chunk 64"), |b| {
            b.iter(|| {
                let mut s = Session::new(&model, n, 64).unwrap();
                s.feed(&tokens, 64, None).unwrap();
            })
        });
        // Decode 32 tokens after a 256-token prompt (restored from a snapshot each time).
        let mut base = Session::new(&model, n, 64).unwrap();
        base.feed(&tokens[..256], 64, None).unwrap();
        let snap = base.snapshot().unwrap();
        g.throughput(Throughput::Elements(32));
        g.bench_function("decode 32 tokens at 256", |b| {
            let mut s = Session::new(&model, n, 64).unwrap();
            b.iter(|| {
                s.restore(&snap).unwrap();
                for &t in &tokens[256..288] {
                    s.decode(t).unwrap();
                }
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
