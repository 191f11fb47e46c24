//! The CPU merge's arithmetic, one group per question:
//! - "merge rows on the CPU": `lora_kernels::cpu::merge_rows` over a 4096 × 4096 BF16 weight
//!   (a Llama attention projection) with a rank-16 and a rank-64 product, all cores; the
//!   throughput counts the base read and the 16-bit output written, the bytes a merge moves.
//!   The same arithmetic bounds the CPU path of `weightsmith merge` when the disk does not.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_kernels::cpu::merge_rows;
use lora_kernels::{LoraProduct, LoraTerm};
use st_io::Dtype;

fn merge_rows_cpu(c: &mut Criterion) {
    let (rows, cols) = (4096usize, 4096usize);
    let base: Vec<u8> = (0..rows * cols)
        .flat_map(|i| (0x3c00u16 ^ (i as u16 & 0x00ff)).to_le_bytes())
        .collect();
    let mut out = vec![0u8; rows * cols * 2];
    let mut group = c.benchmark_group("merge rows on the CPU");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    for rank in [16usize, 64] {
        let a: Vec<f32> = (0..rank * cols)
            .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
            .collect();
        let b: Vec<f32> = (0..rows * rank)
            .map(|i| ((i % 89) as f32 - 44.0) * 1e-3)
            .collect();
        let term = LoraTerm {
            a: &a,
            b: &b,
            rank,
            scale: 2.0,
        };
        let product = LoraProduct::new(rows, cols, false, &[term]).unwrap();
        group.bench_function(
            BenchmarkId::new("4096x4096 BF16", format!("r={rank}")),
            |bch| {
                bch.iter(|| {
                    merge_rows(
                        &base,
                        Dtype::BF16,
                        cols,
                        Some(&product),
                        None,
                        0,
                        Dtype::BF16,
                        &mut out,
                    )
                    .unwrap()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, merge_rows_cpu);
criterion_main!(benches);
