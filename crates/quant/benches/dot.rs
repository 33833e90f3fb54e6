//! Single-core throughput of the fast dots, in GB/s of weight bytes, at the
//! Flash row sizes (4096 and 2048 inputs).
//!
//! * `row/*`: one row, repeated (weights hot in L1/L2: the compute ceiling).
//! * `matvec/*`: a 64 MiB weight matrix, every row once per iteration (weights
//!   stream from DRAM, as in decode).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ds4_quant::{
    ActQ8_0, BlockIQ2XXS, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K, GgmlType, dot_f16_f32, dot_f32,
    dot_iq2_xxs_q8_k, dot_q2_k_q8_k, dot_q4_k_q8_k, dot_q8_0, quantize_act_q8_0, quantize_act_q8_k,
};
use half::f16;
use std::hint::black_box;
use std::time::Duration;

const MATRIX_BYTES: usize = 64 << 20;

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

/// Random blocks with small finite f16 scales at the given byte offsets.
fn random_blocks<B: bytemuck::Pod>(n: usize, scale_offsets: &[usize], seed: u64) -> Vec<B> {
    let size = std::mem::size_of::<B>();
    let mut raw = random_bytes(n * size, seed);
    for b in raw.chunks_exact_mut(size) {
        for &o in scale_offsets {
            b[o..o + 2].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes());
        }
    }
    raw.chunks_exact(size)
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

fn activations(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Benchmarks `dot(row_i, x)` for one hot row and for a DRAM-sized matrix.
fn bench_type<W: bytemuck::Pod + Sync, X: Sync>(
    c: &mut Criterion,
    name: &str,
    ty: GgmlType,
    make: impl Fn(usize) -> Vec<W>,
    x: &[X],
    dot: impl Fn(&[W], &[X]) -> f32,
    n_in: usize,
) {
    let per_row = x.len();
    let row_bytes = ty.row_bytes(n_in as u64).unwrap_or(0) as usize;
    let n_rows = MATRIX_BYTES / row_bytes;
    let w = make(n_rows * per_row);

    let mut g = c.benchmark_group(format!("row/{name}"));
    g.throughput(Throughput::Bytes(row_bytes as u64));
    g.bench_function(BenchmarkId::from_parameter(n_in), |b| {
        b.iter(|| dot(black_box(&w[..per_row]), black_box(x)))
    });
    g.finish();

    let mut g = c.benchmark_group(format!("matvec/{name}"));
    g.throughput(Throughput::Bytes((n_rows * row_bytes) as u64));
    g.bench_function(BenchmarkId::from_parameter(n_in), |b| {
        b.iter(|| {
            let mut s = 0f32;
            for row in w.chunks_exact(per_row) {
                s += dot(row, black_box(x));
            }
            s
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    for n_in in [4096usize, 2048] {
        let xf = activations(n_in);
        let x8: Vec<ActQ8_0> = quantize_act_q8_0(&xf);
        let xk: Vec<BlockQ8K> = quantize_act_q8_k(&xf);
        bench_type(
            c,
            "q8_0",
            GgmlType::Q8_0,
            |n| random_blocks::<BlockQ8_0>(n, &[0], 1),
            &x8,
            dot_q8_0,
            n_in,
        );
        bench_type(
            c,
            "q2_k",
            GgmlType::Q2_K,
            |n| random_blocks::<BlockQ2K>(n, &[80, 82], 2),
            &xk,
            dot_q2_k_q8_k,
            n_in,
        );
        bench_type(
            c,
            "q4_k",
            GgmlType::Q4_K,
            |n| random_blocks::<BlockQ4K>(n, &[0, 2], 3),
            &xk,
            dot_q4_k_q8_k,
            n_in,
        );
        bench_type(
            c,
            "iq2_xxs",
            GgmlType::IQ2_XXS,
            |n| random_blocks::<BlockIQ2XXS>(n, &[0], 4),
            &xk,
            dot_iq2_xxs_q8_k,
            n_in,
        );
        bench_type(
            c,
            "f16",
            GgmlType::F16,
            |n| vec![f16::from_f32(0.5); n],
            &xf,
            dot_f16_f32,
            n_in,
        );
        bench_type(c, "f32", GgmlType::F32, activations, &xf, dot_f32, n_in);
    }
}

criterion_group! {
    name = dot;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = benches
}
criterion_main!(dot);
