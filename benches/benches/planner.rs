//! Planner benchmarks, one group per question:
//! - "plan 1000 units": the pure planner, greedy and balanced, 998 layers on 8 GPUs.
//! - "plan a 70B checkpoint": `weightsmith plan` end to end on a Llama-3-70B-shaped sparse
//!   checkpoint (723 tensors, 141 GB): open, validate, group, plan; and the `max` context search.

use criterion::{criterion_group, criterion_main, Criterion};
use planner::{CacheDtype, CacheSpec, DeviceSpec, ModelDims, PlanRequest, Strategy, UnitSpec};
use st_io::layout::UnitKind;
use weightsmith::plan::{DeviceChoice, PlanOptions, SeqLen, SplitChoice};
use weightsmith_benches::write_sparse_llama3_70b;

fn thousand_units(strategy: Strategy) -> PlanRequest {
    let mut units = vec![UnitSpec {
        name: "embedding".into(),
        kind: UnitKind::Embedding,
        weight_bytes: 2 << 30,
    }];
    for i in 0..998u64 {
        // Uneven layers, as MoE and hybrid models have.
        let weight_bytes = (200 << 20) + (i * 7919 % 97) * (1 << 20);
        units.push(UnitSpec {
            name: format!("layers.{i}"),
            kind: UnitKind::Layer(i),
            weight_bytes,
        });
    }
    units.push(UnitSpec {
        name: "head".into(),
        kind: UnitKind::Head,
        weight_bytes: 2 << 30,
    });
    PlanRequest {
        units,
        dims: ModelDims {
            kv_heads: 8,
            head_dim: 128,
            hidden_size: 8192,
            intermediate_size: 28672,
            vocab_size: 128256,
            ..Default::default()
        },
        cache: CacheSpec {
            seq_len: 8192,
            batch: 1,
            dtype: CacheDtype::F16,
        },
        devices: (0..8)
            .map(|i| DeviceSpec {
                name: format!("cuda:{i}"),
                capacity_bytes: 80 << 30,
                reserve_bytes: 1 << 30,
                overhead_bytes: None,
            })
            .collect(),
        strategy,
        embedding_on_host: false,
    }
}

fn plan_1000_units(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan 1000 units");
    for strategy in [Strategy::Greedy, Strategy::Balanced] {
        let req = thousand_units(strategy.clone());
        planner::plan(&req).expect("fits");
        group.bench_function(strategy.name(), |b| b.iter(|| planner::plan(&req).unwrap()));
    }
    group.finish();
}

fn plan_70b(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    write_sparse_llama3_70b(dir.path());
    let options = |seq_len, split| PlanOptions {
        devices: DeviceChoice::Simulated(vec![80 << 30, 80 << 30]),
        seq_len,
        split,
        ..PlanOptions::default()
    };
    let mut group = c.benchmark_group("plan a 70B checkpoint");
    for (label, opts) in [
        (
            "greedy 8192",
            options(SeqLen::Tokens(8192), SplitChoice::Greedy),
        ),
        (
            "balanced 8192",
            options(SeqLen::Tokens(8192), SplitChoice::Balanced),
        ),
        (
            "balanced max context",
            options(SeqLen::Max, SplitChoice::Balanced),
        ),
    ] {
        weightsmith::plan_checkpoint(dir.path(), &opts).expect("fits");
        group.bench_function(label, |b| {
            b.iter(|| weightsmith::plan_checkpoint(dir.path(), &opts).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, plan_1000_units, plan_70b);
criterion_main!(benches);
