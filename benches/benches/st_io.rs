//! st-io benchmarks, one group per question:
//! - "inspect a 16 GB header": `weightsmith::inspect` of a 291-tensor Llama-3-8B-shaped checkpoint
//!   (sparse file) — open, map, validate, group, report. Target < 50 ms.
//! - "convert to 16-bit": F32/BF16 → BF16/F16 of 16 Mi elements; throughput in output bytes
//!   on one core. Target ≥ 1 GB/s.
//! - "write shards": 1.27 GB through the streaming sharded writer into files that live in the
//!   page cache only (/dev/shm when present), so the figure is the writer's cost, not a disk's.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use st_io::{convert, Dtype, ShardWriter, TensorSpec, WriterOptions};
use weightsmith_benches::{llama_specs, write_sparse_llama3_8b};

fn inspect_16gb(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let bytes = write_sparse_llama3_8b(dir.path());
    assert_eq!(bytes, 16_060_522_496);
    let mut group = c.benchmark_group("inspect a 16 GB header");
    group.bench_function("llama3-8b 291 tensors", |b| {
        b.iter(|| {
            let report = weightsmith::inspect(dir.path(), &Default::default()).unwrap();
            assert_eq!(report.tensor_count, 291);
            report
        })
    });
    group.finish();
}

fn convert_16bit(c: &mut Criterion) {
    let n = 16 << 20;
    let f32_input: Vec<u8> = (0..n)
        .flat_map(|i| ((i as f32) * 0.001 - 7.0).to_le_bytes())
        .collect();
    let bf16_input = convert::convert_to_vec(Dtype::F32, Dtype::BF16, &f32_input).unwrap();
    let mut output = vec![0u8; n * 2];
    let mut group = c.benchmark_group("convert to 16-bit");
    group.throughput(Throughput::Bytes((n * 2) as u64));
    for (from, to, input) in [
        (Dtype::F32, Dtype::BF16, &f32_input),
        (Dtype::F32, Dtype::F16, &f32_input),
        (Dtype::BF16, Dtype::F16, &bf16_input),
    ] {
        group.bench_function(
            BenchmarkId::new(format!("{from}->{to}"), "16Mi elements"),
            |b| b.iter(|| convert::convert(from, to, input, &mut output).unwrap()),
        );
    }
    group.finish();
}

fn write_shards(c: &mut Criterion) {
    // A 1 GB Llama-shaped model: 8 layers of hidden 2048.
    let specs: Vec<TensorSpec> = llama_specs(8, 2048, 8192, 16, 8, 32000);
    let total: u64 = specs.iter().map(|s| s.bytes().unwrap()).sum();
    let largest = specs.iter().map(|s| s.bytes().unwrap()).max().unwrap() as usize;
    let data = vec![0x3cu8; largest];
    // tmpfs when there is one: a file system that is only page cache, so the figure is the
    // writer's own cost and not the disk's.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let mut group = c.benchmark_group("write shards");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(total));
    let dest = dir.path().join("out");
    group.bench_function(
        BenchmarkId::new(
            "page cache",
            format!("{} MB, 200MB shards", total / 1_000_000),
        ),
        |b| {
            b.iter_batched(
                || {
                    // Removing the previous output is set-up, not timed.
                    let _ = std::fs::remove_dir_all(&dest);
                },
                |()| {
                    let options = WriterOptions {
                        max_shard_bytes: 200_000_000,
                        sync: false,
                        ..Default::default()
                    };
                    let mut w = ShardWriter::create(&dest, specs.clone(), options).unwrap();
                    for s in &specs {
                        w.write_tensor(&s.name, &data[..s.bytes().unwrap() as usize])
                            .unwrap();
                    }
                    w.finish().unwrap()
                },
                criterion::BatchSize::PerIteration,
            )
        },
    );
    // The ceiling on this machine: the same bytes with plain 64 MiB write() calls, one file.
    group.bench_function(
        BenchmarkId::new(
            "baseline: plain write()",
            format!("{} MB", total / 1_000_000),
        ),
        |b| {
            let chunk = vec![0x3cu8; 64 << 20];
            let path = dir.path().join("plain");
            b.iter_batched(
                || {
                    let _ = std::fs::remove_file(&path);
                },
                |()| {
                    use std::io::Write;
                    let mut f = std::fs::File::create(&path).unwrap();
                    let mut left = total as usize;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        f.write_all(&chunk[..n]).unwrap();
                        left -= n;
                    }
                },
                criterion::BatchSize::PerIteration,
            )
        },
    );
    group.finish();
}

criterion_group!(benches, inspect_16gb, convert_16bit, write_shards);
criterion_main!(benches);
