//! Worked examples: the behaviours users of exllamav2, accelerate and vLLM asked for.

use planner::{
    max_seq_len, plan, CacheDtype, CacheSpec, DeviceSpec, Error, ModelDims, Placement, PlanRequest,
    Strategy, UnitSpec,
};
use st_io::layout::UnitKind;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Llama-3-8B in bf16: 1.05 GB embedding, 32 layers of 436 MB, 1.05 GB head.
fn llama3_8b() -> Vec<UnitSpec> {
    let mut units = vec![UnitSpec {
        name: "embedding".into(),
        kind: UnitKind::Embedding,
        weight_bytes: 128256 * 4096 * 2,
    }];
    let layer = 2 * (4096 * 4096 * 2 + 1024 * 4096 * 2 + 3 * 4096 * 14336 + 4096);
    for i in 0..32 {
        units.push(UnitSpec {
            name: format!("layers.{i}"),
            kind: UnitKind::Layer(i),
            weight_bytes: layer,
        });
    }
    units.push(UnitSpec {
        name: "norm".into(),
        kind: UnitKind::Norm,
        weight_bytes: 8192,
    });
    units.push(UnitSpec {
        name: "head".into(),
        kind: UnitKind::Head,
        weight_bytes: 128256 * 4096 * 2,
    });
    units
}

fn dims() -> ModelDims {
    ModelDims {
        kv_heads: 8,
        head_dim: 128,
        hidden_size: 4096,
        intermediate_size: 14336,
        vocab_size: 128256,
        ..ModelDims::default()
    }
}

fn gpu(i: usize, gib: u64) -> DeviceSpec {
    DeviceSpec {
        name: format!("cuda:{i}"),
        capacity_bytes: gib * GIB,
        reserve_bytes: 0,
        overhead_bytes: None,
    }
}

fn request(devices: Vec<DeviceSpec>, strategy: Strategy, seq_len: u64) -> PlanRequest {
    PlanRequest {
        units: llama3_8b(),
        dims: dims(),
        cache: CacheSpec {
            seq_len,
            batch: 1,
            dtype: CacheDtype::F16,
        },
        devices,
        strategy,
        embedding_on_host: false,
    }
}

#[test]
fn fits_an_8b_model_on_one_24gib_card_with_its_cache() {
    let p = plan(&request(vec![gpu(0, 24)], Strategy::Greedy, 8192)).unwrap();
    let d = &p.devices[0];
    assert_eq!(
        d.cache_bytes,
        32 * 8192 * 4096,
        "4 KiB per token per layer, 32 layers"
    );
    assert_eq!(d.units.len(), 35);
    assert!(d.free_after_bytes > 0);
    assert!(d.overhead_bytes >= 512 * MIB);
}

#[test]
fn balanced_gives_the_embedding_and_head_stages_fewer_layers() {
    // Four equal GPUs: an even 8/8/8/8 split overloads the first and last stages (vLLM #6920).
    let devices = (0..4).map(|i| gpu(i, 12)).collect();
    let p = plan(&request(devices, Strategy::Balanced, 32768)).unwrap();
    let layers = p.layers_per_device();
    assert_eq!(layers.iter().sum::<u64>(), 32);
    assert!(layers[0] < layers[1] && layers[3] < layers[2], "{layers:?}");
    let greedy = plan(&request(
        (0..4).map(|i| gpu(i, 12)).collect(),
        Strategy::Greedy,
        32768,
    ))
    .unwrap();
    assert!(p.worst_relative_load() <= greedy.worst_relative_load());
}

#[test]
fn mixed_card_sizes_just_work() {
    // 24 GB + 8 GB (vLLM #2317): the big card takes proportionally more.
    let p = plan(&request(
        vec![gpu(0, 24), gpu(1, 8)],
        Strategy::Balanced,
        16384,
    ))
    .unwrap();
    let layers = p.layers_per_device();
    assert!(layers[0] > 2 * layers[1], "{layers:?}");
    let ratios: Vec<f64> = p
        .devices
        .iter()
        .map(|d| {
            (d.weight_bytes + d.cache_bytes + d.overhead_bytes) as f64 / d.capacity_bytes as f64
        })
        .collect();
    assert!((ratios[0] - ratios[1]).abs() < 0.1, "{ratios:?}");
}

#[test]
fn refuses_what_does_not_fit_and_says_what_would() {
    let e = plan(&request(vec![gpu(0, 20)], Strategy::Greedy, 65536)).unwrap_err();
    let Error::DoesNotFit {
        first_unit,
        needed_bytes,
        available_bytes,
        ..
    } = &e
    else {
        panic!("{e}")
    };
    assert!(needed_bytes > available_bytes);
    assert!(first_unit.starts_with("layers."), "{first_unit}");
    let text = e.to_string();
    assert!(text.contains("--cache-seq-len"), "{text}");
    assert!(
        text.contains("--cache-dtype q4")
            || text.contains("--cache-dtype q6")
            || text.contains("--cache-dtype q8")
            || text.contains("--cache-dtype fp8"),
        "{text}"
    );
    assert!(text.contains("more devices: 1 more like cuda:0"), "{text}");
    // The suggested sequence length really fits, and one more token does not.
    let n: u64 = text
        .split("--cache-seq-len ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(plan(&request(vec![gpu(0, 20)], Strategy::Greedy, n)).is_ok());
    assert!(plan(&request(vec![gpu(0, 20)], Strategy::Greedy, n + 1)).is_err());
}

#[test]
fn finds_the_largest_context_that_fits() {
    let req = request(vec![gpu(0, 24)], Strategy::Greedy, 0);
    let (n, p) = max_seq_len(&req, 1 << 20).unwrap();
    assert_eq!(p.cache.seq_len, n);
    let mut more = req.clone();
    more.cache.seq_len = n + 1;
    assert!(plan(&more).is_err());
    // Capped by the model's context length when everything fits.
    let (n, _) = max_seq_len(&req, 8192).unwrap();
    assert_eq!(n, 8192);
    // Nothing fits at all.
    let tiny = request(vec![gpu(0, 4)], Strategy::Greedy, 0);
    assert!(matches!(
        max_seq_len(&tiny, 8192),
        Err(Error::DoesNotFit { .. })
    ));
}

#[test]
fn the_embedding_can_stay_on_the_host() {
    let mut req = request(vec![gpu(0, 24)], Strategy::Greedy, 4096);
    req.embedding_on_host = true;
    let p = plan(&req).unwrap();
    assert_eq!(p.units[0].device, Placement::Host);
    assert_eq!(p.host_bytes, 128256 * 4096 * 2);
    assert!(!p.devices[0].units.contains(&"embedding".to_string()));
}

#[test]
fn a_tied_head_needs_a_gpu_copy_when_the_embedding_stays_on_the_host() {
    let mut req = request(vec![gpu(0, 24)], Strategy::Greedy, 0);
    req.units.last_mut().unwrap().weight_bytes = 0; // tied
    let on_gpu = plan(&req).unwrap();
    req.embedding_on_host = true;
    let on_host = plan(&req).unwrap();
    assert_eq!(
        on_host.devices[0].weight_bytes, on_gpu.devices[0].weight_bytes,
        "the head copy replaces the embedding"
    );
}

#[test]
fn manual_splits_follow_the_user() {
    let p = plan(&request(
        vec![gpu(0, 24), gpu(1, 24)],
        Strategy::ManualLayers(vec![10, 22]),
        4096,
    ))
    .unwrap();
    assert_eq!(p.layers_per_device(), vec![10, 22]);
    assert_eq!(p.units[0].device, Placement::Device(0));
    assert_eq!(p.units.last().unwrap().device, Placement::Device(1));
    let p = plan(&request(
        vec![gpu(0, 24), gpu(1, 24)],
        Strategy::ManualBytes(vec![6 * GIB, 20 * GIB]),
        4096,
    ))
    .unwrap();
    assert!(p.devices[0].weight_bytes + p.devices[0].cache_bytes <= 6 * GIB);
    let e = plan(&request(
        vec![gpu(0, 24)],
        Strategy::ManualLayers(vec![10]),
        0,
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the layer split places 10 layers but the model has 32"
    );
    let e = plan(&request(
        vec![gpu(0, 24)],
        Strategy::ManualBytes(vec![1, 2]),
        0,
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the split has 2 entries but there are 1 devices"
    );
    let e = plan(&request(
        vec![gpu(0, 24)],
        Strategy::ManualBytes(vec![30 * GIB]),
        0,
    ))
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("device cuda:0: split of 30.00 GiB is more than the"),
        "{e}"
    );
}

#[test]
fn rejects_a_reserve_larger_than_the_device_and_no_devices() {
    let mut d = gpu(0, 8);
    d.reserve_bytes = 9 * GIB;
    let e = plan(&request(vec![d], Strategy::Greedy, 0)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "device cuda:0: reserve of 9.00 GiB is more than its 8.00 GiB of capacity"
    );
    assert_eq!(
        plan(&request(vec![], Strategy::Greedy, 0)).unwrap_err(),
        Error::NoDevices
    );
}

#[test]
fn quantised_caches_shrink_the_cache() {
    let f16 = plan(&request(vec![gpu(0, 80)], Strategy::Greedy, 65536)).unwrap();
    let mut req = request(vec![gpu(0, 80)], Strategy::Greedy, 65536);
    req.cache.dtype = CacheDtype::Q4;
    let q4 = plan(&req).unwrap();
    assert_eq!(
        q4.devices[0].cache_bytes * 32,
        f16.devices[0].cache_bytes * 9,
        "Q4 = 4.5 bits per element with scales"
    );
}

#[test]
fn a_device_whose_overhead_exceeds_its_room_takes_nothing() {
    // Not even a zero-byte unit: its CUDA context alone would not fit.
    let mut req = request(vec![gpu(0, 24), gpu(1, 24)], Strategy::Greedy, 0);
    req.devices[0].capacity_bytes = 100 * MIB;
    req.devices[0].overhead_bytes = Some(200 * MIB);
    for strategy in [Strategy::Greedy, Strategy::Balanced] {
        req.strategy = strategy;
        let p = plan(&req).unwrap();
        assert!(p.devices[0].units.is_empty(), "{:?}", p.devices[0].units);
        assert_eq!(p.devices[0].overhead_bytes, 0);
    }
    req.strategy = Strategy::ManualLayers(vec![1, 31]);
    assert!(matches!(plan(&req), Err(Error::DoesNotFit { .. })));
}
