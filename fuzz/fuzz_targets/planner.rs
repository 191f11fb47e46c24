//! The planner over any numbers (sizes, counts, cache lengths, splits, fixed maps across the
//! whole u64 range): never a panic, and a plan that says it fits does fit, recomputed in u128.
#![no_main]
use libfuzzer_sys::fuzz_target;
use planner::{
    plan, CacheDtype, CacheSpec, DeviceSpec, ModelDims, Placement, PlanRequest, Strategy, UnitSpec,
};
use st_io::layout::UnitKind;

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u64(&mut self) -> u64 {
        let (head, rest) = self.0.split_at(self.0.len().min(8));
        self.0 = rest;
        let mut b = [0u8; 8];
        b[..head.len()].copy_from_slice(head);
        u64::from_le_bytes(b)
    }
    fn small(&mut self, n: u64) -> u64 {
        self.u64() % n.max(1)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let layers = b.small(12);
    let mut units = vec![UnitSpec {
        name: "embedding".into(),
        kind: UnitKind::Embedding,
        weight_bytes: b.u64(),
    }];
    for i in 0..layers {
        units.push(UnitSpec {
            name: format!("layers.{i}"),
            kind: UnitKind::Layer(i),
            weight_bytes: b.u64(),
        });
    }
    units.push(UnitSpec {
        name: "norm".into(),
        kind: UnitKind::Norm,
        weight_bytes: b.u64(),
    });
    units.push(UnitSpec {
        name: "head".into(),
        kind: UnitKind::Head,
        weight_bytes: b.u64(),
    });
    let dims = ModelDims {
        kv_heads: b.u64(),
        head_dim: b.u64(),
        hidden_size: b.u64(),
        intermediate_size: b.u64(),
        vocab_size: b.u64(),
        sliding_window: if b.small(2) == 0 { None } else { Some(b.u64()) },
        sliding_layers: None,
    };
    let dtype = CacheDtype::ALL[b.small(CacheDtype::ALL.len() as u64) as usize];
    let cache = CacheSpec {
        seq_len: b.u64(),
        batch: b.u64(),
        dtype,
    };
    let n = 1 + b.small(4) as usize;
    let devices: Vec<DeviceSpec> = (0..n)
        .map(|i| {
            let capacity_bytes = b.u64();
            let reserve_bytes = b.u64().min(capacity_bytes);
            let overhead_bytes = if b.small(2) == 0 { None } else { Some(b.u64()) };
            DeviceSpec {
                name: format!("cuda:{i}"),
                capacity_bytes,
                reserve_bytes,
                overhead_bytes,
            }
        })
        .collect();
    let strategy = match b.small(5) {
        0 => Strategy::Greedy,
        1 => Strategy::Balanced,
        2 => Strategy::ManualBytes((0..n).map(|_| b.u64()).collect()),
        3 => Strategy::ManualLayers((0..n).map(|_| b.small(layers + 2)).collect()),
        _ => Strategy::Fixed(
            units
                .iter()
                .map(|_| match b.small(n as u64 + 2) as usize {
                    d if d < n + 1 => Placement::Device(d), // one past the end now and then
                    _ => Placement::Host,
                })
                .collect(),
        ),
    };
    let embedding_on_host = b.small(2) == 1;
    let request = PlanRequest {
        units,
        dims,
        cache,
        devices,
        strategy,
        embedding_on_host,
    };
    if let Ok(p) = plan(&request) {
        for d in &p.devices {
            let used = d.reserve_bytes as u128
                + d.weight_bytes as u128
                + d.cache_bytes as u128
                + d.overhead_bytes as u128;
            assert!(
                used <= d.capacity_bytes as u128,
                "{} holds {used} bytes in {}",
                d.name,
                d.capacity_bytes
            );
        }
    }
});
