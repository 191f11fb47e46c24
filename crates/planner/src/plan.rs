//! The placement algorithm.
//!
//! The units are turned into *items* placed as a whole, in model order: the embedding (unless
//! it goes to the host), each decoder layer but the last, the last layer together with the
//! final norm and the head (the head goes with the last layer), then each `other` unit. An item's load is its
//! weights plus the KV cache of its layer (plus the head's logits scratch). Each device offers
//! a budget of capacity − reserve − overhead; a device's items must fit in it, so every
//! layer's cache is counted on its own device, cumulatively.

use serde::Serialize;
use st_io::layout::UnitKind;

use crate::cache::{default_overhead_bytes, head_scratch_bytes, CacheDtype, CacheSpec, ModelDims};
use crate::Error;

/// One placement unit as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitSpec {
    pub name: String,
    pub kind: UnitKind,
    /// Weight bytes (a tied head counts 0: its weight is the embedding's).
    pub weight_bytes: u64,
}

/// A GPU, real or simulated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceSpec {
    /// `cuda:0`, or a label for a simulated device.
    pub name: String,
    /// Bytes free for this model (free memory as the driver reports it).
    pub capacity_bytes: u64,
    /// Bytes the plan must leave untouched (other processes, fragmentation, what the user wants
    /// to keep). The plan already counts weights, KV cache, and `overhead_bytes`.
    pub reserve_bytes: u64,
    /// CUDA context, workspaces and activation scratch; `None` for the estimate of
    /// [`default_overhead_bytes`].
    pub overhead_bytes: Option<u64>,
}

/// How to place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// exllamav2's autosplit: fill devices in order.
    Greedy,
    /// Contiguous ranges minimising the largest load relative to each device's budget.
    Balanced,
    /// exllamav2's `gpu_split`: at most this many bytes (weights + cache) per device, filled in
    /// order.
    ManualBytes(Vec<u64>),
    /// Decoder layers per device (vLLM's `VLLM_PP_LAYER_PARTITION`); the embedding goes with
    /// the first device, norm and head with the last layer.
    ManualLayers(Vec<u64>),
    /// Each unit's place, given (one per unit, in [`PlanRequest::units`] order): a device map
    /// made by hand or by another tool. The plan checks that every device holds what it is
    /// given, counting caches, overhead and the head's scratch as for any other strategy.
    Fixed(Vec<Placement>),
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Greedy => "greedy",
            Strategy::Balanced => "balanced",
            Strategy::ManualBytes(_) | Strategy::ManualLayers(_) => "manual",
            Strategy::Fixed(_) => "fixed",
        }
    }
}

/// Everything a plan depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanRequest {
    /// In model order, as st-io's layout gives them.
    pub units: Vec<UnitSpec>,
    pub dims: ModelDims,
    pub cache: CacheSpec,
    pub devices: Vec<DeviceSpec>,
    pub strategy: Strategy,
    /// Keep the embedding in host memory (saves VRAM; lookups are cheap).
    pub embedding_on_host: bool,
}

/// Where a unit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    Host,
    Device(usize),
}

impl Serialize for Placement {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Placement::Host => s.serialize_str("host"),
            Placement::Device(i) => s.serialize_u64(*i as u64),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedUnit {
    pub name: String,
    pub device: Placement,
    pub weight_bytes: u64,
    /// KV cache of this layer, on the same device.
    pub cache_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceLoad {
    pub index: usize,
    pub name: String,
    pub capacity_bytes: u64,
    pub reserve_bytes: u64,
    pub weight_bytes: u64,
    pub cache_bytes: u64,
    /// Context and scratch (and the head's logits scratch on the head's device); 0 for an
    /// unused device.
    pub overhead_bytes: u64,
    pub free_after_bytes: u64,
    pub units: Vec<String>,
}

/// The result: each unit's device, and each device's totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub strategy: &'static str,
    pub cache: CacheSpec,
    pub devices: Vec<DeviceLoad>,
    pub units: Vec<PlannedUnit>,
    /// Bytes kept in host memory (the embedding with `embedding_on_host`).
    pub host_bytes: u64,
}

impl Plan {
    /// Decoder layers per device, in device order (vLLM's pipeline partition).
    pub fn layers_per_device(&self) -> Vec<u64> {
        let mut counts = vec![0u64; self.devices.len()];
        for u in &self.units {
            if let (Placement::Device(d), true) = (u.device, u.name.starts_with("layers.")) {
                counts[d] += 1;
            }
        }
        counts
    }

    /// The largest load of a device relative to its budget (capacity − reserve − overhead).
    pub fn worst_relative_load(&self) -> f64 {
        self.devices
            .iter()
            .filter(|d| !d.units.is_empty())
            .map(|d| {
                let used = (d.weight_bytes + d.cache_bytes + d.overhead_bytes) as f64;
                used / (d.capacity_bytes - d.reserve_bytes) as f64
            })
            .fold(0.0, f64::max)
    }
}

/// A group of units placed together.
#[derive(Debug, Clone)]
struct Item {
    units: Vec<usize>,
    load: u64,
}

struct Prepared {
    items: Vec<Item>,
    /// Bytes each device can take for units; -1 for a device that can take nothing.
    budgets: Vec<i128>,
    base_overheads: Vec<u64>,
    weights: Vec<u64>,
    caches: Vec<u64>,
    head_scratch: u64,
    head_item: Option<usize>,
}

fn prepare(req: &PlanRequest) -> Result<Prepared, Error> {
    if req.devices.is_empty() {
        return Err(Error::NoDevices);
    }
    let mut base_overheads = Vec::with_capacity(req.devices.len());
    let mut budgets = Vec::with_capacity(req.devices.len());
    for d in &req.devices {
        if d.reserve_bytes > d.capacity_bytes {
            return Err(Error::ReserveTooLarge {
                device: d.name.clone(),
                reserve_bytes: d.reserve_bytes,
                capacity_bytes: d.capacity_bytes,
            });
        }
        let overhead = d
            .overhead_bytes
            .unwrap_or_else(|| default_overhead_bytes(&req.dims, &req.cache));
        base_overheads.push(overhead);
        // A device whose overhead alone exceeds its room can hold nothing, not even a
        // zero-byte unit (its context would not fit): budget -1.
        let room = d.capacity_bytes - d.reserve_bytes;
        budgets.push(if overhead > room {
            -1
        } else {
            (room - overhead) as i128
        });
    }
    let embedding_bytes: u64 = req
        .units
        .iter()
        .filter(|u| u.kind == UnitKind::Embedding)
        .map(|u| u.weight_bytes)
        .fold(0u64, u64::saturating_add);
    let mut weights = Vec::with_capacity(req.units.len());
    let mut caches = Vec::with_capacity(req.units.len());
    for u in &req.units {
        let mut w = u.weight_bytes;
        // A tied head whose embedding stays on the host needs its own copy on the GPU.
        if u.kind == UnitKind::Head && w == 0 && req.embedding_on_host {
            w = embedding_bytes;
        }
        weights.push(w);
        caches.push(match u.kind {
            UnitKind::Layer(i) => req.dims.cache_bytes(i, &req.cache),
            _ => 0,
        });
    }
    let has_head = req.units.iter().any(|u| u.kind == UnitKind::Head);
    let head_scratch = if has_head {
        head_scratch_bytes(&req.dims, &req.cache)
    } else {
        0
    };
    // In model order: embedding, each layer but the last, the tail group (last layer, norm,
    // head), then `other` units one by one.
    let mut front = Vec::new();
    let mut layers = Vec::new();
    let mut tail = Vec::new();
    let mut others = Vec::new();
    for (i, u) in req.units.iter().enumerate() {
        match u.kind {
            UnitKind::Embedding if req.embedding_on_host => {} // stays on the host
            UnitKind::Embedding => front.push(i),
            UnitKind::Other => others.push(i),
            UnitKind::Layer(_) => layers.push(i),
            UnitKind::Norm | UnitKind::Head => tail.push(i),
        }
    }
    if let Some(last) = layers.pop() {
        tail.insert(0, last);
    }
    // Saturating: a size past u64 fits no device and is refused as not fitting.
    let load = |ids: &[usize]| {
        ids.iter().fold(0u64, |a, &i| {
            a.saturating_add(weights[i].saturating_add(caches[i]))
        })
    };
    let single = |&i: &usize| Item {
        units: vec![i],
        load: load(&[i]),
    };
    let mut items: Vec<Item> = front.iter().chain(&layers).map(single).collect();
    let mut head_item = None;
    if !tail.is_empty() {
        let holds_head = tail.iter().any(|&i| req.units[i].kind == UnitKind::Head);
        let scratch = if holds_head { head_scratch } else { 0 };
        head_item = holds_head.then_some(items.len());
        items.push(Item {
            load: load(&tail).saturating_add(scratch),
            units: tail,
        });
    }
    items.extend(others.iter().map(single));
    Ok(Prepared {
        items,
        budgets,
        base_overheads,
        weights,
        caches,
        head_scratch,
        head_item,
    })
}

/// Plans. On `DoesNotFit`, the error says what was needed, what was available, the first unit
/// that did not fit, and which changes would make the model fit.
///
/// ```
/// use planner::{plan, CacheDtype, CacheSpec, DeviceSpec, ModelDims, Placement, PlanRequest, Strategy, UnitSpec};
/// use st_io::layout::UnitKind;
/// const GIB: u64 = 1 << 30;
/// // An 8-layer model of 1 GiB layers, 128 KiB of f16 KV cache per token per layer.
/// let mut units = vec![UnitSpec { name: "embedding".into(), kind: UnitKind::Embedding, weight_bytes: GIB }];
/// for i in 0..8 {
///     units.push(UnitSpec { name: format!("layers.{i}"), kind: UnitKind::Layer(i), weight_bytes: GIB });
/// }
/// units.push(UnitSpec { name: "head".into(), kind: UnitKind::Head, weight_bytes: GIB });
/// let dims = ModelDims { kv_heads: 8, head_dim: 128, hidden_size: 4096, intermediate_size: 14336,
///                        vocab_size: 128256, ..ModelDims::default() };
/// let gpu = |name: &str| DeviceSpec { name: name.into(), capacity_bytes: 8 * GIB, reserve_bytes: GIB / 2,
///                                     overhead_bytes: Some(GIB / 2) };
/// let request = PlanRequest {
///     units, dims,
///     cache: CacheSpec { seq_len: 4096, batch: 1, dtype: CacheDtype::F16 },
///     devices: vec![gpu("cuda:0"), gpu("cuda:1")],
///     strategy: Strategy::Balanced,
///     embedding_on_host: false,
/// };
/// let p = plan(&request)?;
/// assert_eq!(p.layers_per_device(), vec![4, 4]);
/// assert_eq!(p.units[0].device, Placement::Device(0));
/// // The head goes with the last layer; every device keeps its reserve.
/// assert!(p.devices.iter().all(|d| d.free_after_bytes > 0));
/// # Ok::<(), planner::Error>(())
/// ```
pub fn plan(req: &PlanRequest) -> Result<Plan, Error> {
    match plan_without_advice(req) {
        Err(Error::DoesNotFit {
            needed_bytes,
            available_bytes,
            first_unit,
            ..
        }) => Err(Error::DoesNotFit {
            needed_bytes,
            available_bytes,
            first_unit,
            suggestions: suggestions(req),
        }),
        other => other,
    }
}

fn plan_without_advice(req: &PlanRequest) -> Result<Plan, Error> {
    let p = prepare(req)?;
    let assignment = match &req.strategy {
        Strategy::Greedy => greedy(&p.items, &p.budgets),
        Strategy::Balanced => balanced(&p.items, &p.budgets),
        Strategy::ManualBytes(split) => {
            if split.len() != req.devices.len() {
                return Err(Error::SplitLength {
                    entries: split.len(),
                    devices: req.devices.len(),
                });
            }
            let mut budgets = Vec::with_capacity(split.len());
            for (i, (&s, &b)) in split.iter().zip(&p.budgets).enumerate() {
                if s as i128 > b.max(0) {
                    return Err(Error::SplitTooLarge {
                        device: req.devices[i].name.clone(),
                        split_bytes: s,
                        usable_bytes: b.max(0) as u64,
                    });
                }
                // A device that can take nothing stays so whatever its split (0 here).
                budgets.push(if b < 0 { -1 } else { s as i128 });
            }
            greedy(&p.items, &budgets)
        }
        Strategy::ManualLayers(counts) => manual_layers(req, &p, counts)?,
        Strategy::Fixed(placements) => return fixed(req, &p, placements),
    };
    let assignment = assignment
        .map_err(|failed| does_not_fit(req, &p, p.items[failed].units.first().copied()))?;
    let mut unit_device = vec![Placement::Host; req.units.len()];
    for (item, &d) in p.items.iter().zip(&assignment) {
        for &u in &item.units {
            unit_device[u] = Placement::Device(d);
        }
    }
    let head_device = p.head_item.map(|i| assignment[i]);
    Ok(assemble(req, &p, unit_device, head_device))
}

/// Checks a given placement: every unit on a device that exists, and every device within its
/// budget (weights, caches, and the head's scratch where the head is).
fn fixed(req: &PlanRequest, p: &Prepared, placements: &[Placement]) -> Result<Plan, Error> {
    if placements.len() != req.units.len() {
        return Err(Error::PlacementLength {
            entries: placements.len(),
            units: req.units.len(),
        });
    }
    let mut used = vec![0u64; req.devices.len()];
    let mut head_device = None;
    for (u, (unit, &place)) in req.units.iter().zip(placements).enumerate() {
        let Placement::Device(d) = place else {
            continue;
        };
        if d >= req.devices.len() {
            return Err(Error::UnknownDevice {
                unit: unit.name.clone(),
                device: d,
                devices: req.devices.iter().map(|d| d.name.clone()).collect(),
            });
        }
        let mut load = p.weights[u].saturating_add(p.caches[u]);
        if unit.kind == UnitKind::Head {
            load = load.saturating_add(p.head_scratch);
            head_device = Some(d);
        }
        used[d] = used[d].saturating_add(load);
        if used[d] as i128 > p.budgets[d] {
            return Err(does_not_fit(req, p, Some(u)));
        }
    }
    Ok(assemble(req, p, placements.to_vec(), head_device))
}

/// Item index → device, or the index of the first item that did not fit.
type Assignment = Result<Vec<usize>, usize>;

/// exllamav2's rule: fill device 0 until the next item does not fit, then device 1, …
fn greedy(items: &[Item], budgets: &[i128]) -> Assignment {
    let mut out = Vec::with_capacity(items.len());
    let (mut device, mut used) = (0usize, 0u64);
    for (i, item) in items.iter().enumerate() {
        while device < budgets.len() && used as i128 + item.load as i128 > budgets[device] {
            device += 1;
            used = 0;
        }
        if device == budgets.len() {
            return Err(i);
        }
        used = used.saturating_add(item.load);
        out.push(device);
    }
    Ok(out)
}

/// A ratio `num / den` compared exactly.
#[derive(Debug, Clone, Copy)]
struct Ratio {
    num: u128,
    den: u128,
}

impl Ratio {
    fn le(self, other: Ratio) -> bool {
        self.num * other.den <= other.num * self.den
    }
    fn lt(self, other: Ratio) -> bool {
        self.num * other.den < other.num * self.den
    }
}

/// Fills devices in order, each up to `r` × its budget. Returns the assignment, or the
/// per-device loads and first item of each device's range when not everything fit.
fn fill(items: &[Item], budgets: &[i128], r: Ratio) -> (Vec<usize>, Vec<(u64, usize)>) {
    let mut out = Vec::with_capacity(items.len());
    let mut ranges = Vec::with_capacity(budgets.len());
    let mut next = 0;
    for (d, &budget) in budgets.iter().enumerate() {
        let mut used = 0u64;
        if budget < 0 {
            ranges.push((used, next));
            continue;
        }
        let b = budget as u64;
        while next < items.len() {
            let Some(after) = used.checked_add(items[next].load) else {
                break;
            };
            if after > b
                || !(Ratio {
                    num: after as u128,
                    den: b.max(1) as u128,
                })
                .le(r)
                    && after > 0
            {
                break;
            }
            used = after;
            out.push(d);
            next += 1;
        }
        ranges.push((used, next));
    }
    (out, ranges)
}

/// The contiguous split minimising the largest load relative to its device's budget.
///
/// The greedy fill at ratio r (each device up to r × budget) places everything exactly when
/// r ≥ the optimum, and its outcome only changes at breakpoints (load of a device's range plus
/// its next item) / budget. Starting from r = 0, jump to the smallest breakpoint above until
/// everything fits: the first r that fits is the optimum, found with exact integer ratios.
fn balanced(items: &[Item], budgets: &[i128]) -> Assignment {
    let mut r = Ratio { num: 0, den: 1 };
    loop {
        let (out, ranges) = fill(items, budgets, r);
        if out.len() == items.len() {
            return Ok(out);
        }
        let mut best: Option<Ratio> = None;
        for (d, &(used, next)) in ranges.iter().enumerate() {
            if next >= items.len()
                || budgets[d] <= 0
                || used as i128 + items[next].load as i128 > budgets[d]
            {
                continue;
            }
            let b = budgets[d] as u64;
            let candidate = Ratio {
                num: used as u128 + items[next].load as u128,
                den: b as u128,
            };
            if candidate.lt(r) || (!r.lt(candidate) && !candidate.lt(r)) {
                // Not above r: this device is blocked by the capacity, not by r.
                continue;
            }
            if best.is_none_or(|b| candidate.lt(b)) {
                best = Some(candidate);
            }
        }
        match best {
            Some(next_r) => r = next_r,
            None => return Err(out.len()),
        }
    }
}

fn manual_layers(req: &PlanRequest, p: &Prepared, counts: &[u64]) -> Result<Assignment, Error> {
    let layers = req
        .units
        .iter()
        .filter(|u| matches!(u.kind, UnitKind::Layer(_)))
        .count() as u64;
    if counts.len() != req.devices.len() {
        return Err(Error::SplitLength {
            entries: counts.len(),
            devices: req.devices.len(),
        });
    }
    let total: u64 = counts
        .iter()
        .try_fold(0u64, |a, &c| a.checked_add(c))
        .unwrap_or(u64::MAX);
    if total != layers {
        return Err(Error::LayerCountMismatch {
            given: total,
            layers,
        });
    }
    // Device of each layer, in order.
    let mut layer_device = Vec::new();
    for (d, &c) in counts.iter().enumerate() {
        layer_device.extend(std::iter::repeat_n(d, c as usize));
    }
    let first_device = layer_device.first().copied().unwrap_or(0);
    let last_device = layer_device
        .last()
        .copied()
        .unwrap_or(req.devices.len() - 1);
    let mut out = Vec::with_capacity(p.items.len());
    let mut layer = 0;
    for item in &p.items {
        let layer_units = item
            .units
            .iter()
            .filter(|&&u| matches!(req.units[u].kind, UnitKind::Layer(_)))
            .count();
        let device = if layer_units > 0 {
            let d = layer_device[layer];
            layer += layer_units;
            d
        } else if item
            .units
            .iter()
            .any(|&u| req.units[u].kind == UnitKind::Embedding)
        {
            first_device
        } else {
            // Norm and head without layers, and `other` units, come after the last layer.
            last_device
        };
        out.push(device);
    }
    let mut used = vec![0u64; req.devices.len()];
    for (i, &d) in out.iter().enumerate() {
        used[d] = used[d].saturating_add(p.items[i].load);
        if used[d] as i128 > p.budgets[d] {
            return Ok(Err(i));
        }
    }
    Ok(Ok(out))
}

fn does_not_fit(req: &PlanRequest, p: &Prepared, failed_unit: Option<usize>) -> Error {
    let needed: u64 = p
        .items
        .iter()
        .map(|i| i.load)
        .chain(p.base_overheads.iter().copied())
        .fold(0u64, u64::saturating_add);
    let available: u64 = req
        .devices
        .iter()
        .map(|d| d.capacity_bytes.saturating_sub(d.reserve_bytes))
        .fold(0u64, u64::saturating_add);
    let first = failed_unit
        .map(|u| req.units[u].name.clone())
        .unwrap_or_default();
    Error::DoesNotFit {
        needed_bytes: needed,
        available_bytes: available,
        first_unit: first,
        suggestions: Vec::new(),
    }
}

/// The plan for each unit's device (`Host` for units kept in host memory) and the head's.
fn assemble(
    req: &PlanRequest,
    p: &Prepared,
    unit_device: Vec<Placement>,
    head_device: Option<usize>,
) -> Plan {
    let mut devices: Vec<DeviceLoad> = req
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| DeviceLoad {
            index: i,
            name: d.name.clone(),
            capacity_bytes: d.capacity_bytes,
            reserve_bytes: d.reserve_bytes,
            weight_bytes: 0,
            cache_bytes: 0,
            overhead_bytes: 0,
            free_after_bytes: 0,
            units: Vec::new(),
        })
        .collect();
    let mut units = Vec::with_capacity(req.units.len());
    let mut host_bytes: u64 = 0;
    for (i, u) in req.units.iter().enumerate() {
        match unit_device[i] {
            Placement::Device(d) => {
                let dev = &mut devices[d];
                dev.weight_bytes = dev.weight_bytes.saturating_add(p.weights[i]);
                dev.cache_bytes = dev.cache_bytes.saturating_add(p.caches[i]);
                dev.units.push(u.name.clone());
            }
            Placement::Host => host_bytes = host_bytes.saturating_add(p.weights[i]),
        }
        units.push(PlannedUnit {
            name: u.name.clone(),
            device: unit_device[i],
            weight_bytes: p.weights[i],
            cache_bytes: p.caches[i],
        });
    }
    for dev in &mut devices {
        if !dev.units.is_empty() {
            dev.overhead_bytes = p.base_overheads[dev.index];
            if head_device == Some(dev.index) {
                dev.overhead_bytes = dev.overhead_bytes.saturating_add(p.head_scratch);
            }
        }
        dev.free_after_bytes = dev.capacity_bytes.saturating_sub(
            dev.reserve_bytes
                .saturating_add(dev.weight_bytes)
                .saturating_add(dev.cache_bytes)
                .saturating_add(dev.overhead_bytes),
        );
    }
    Plan {
        strategy: req.strategy.name(),
        cache: req.cache,
        devices,
        units,
        host_bytes,
    }
}

/// What would make a request that does not fit, fit.
fn suggestions(req: &PlanRequest) -> Vec<String> {
    let fits = |r: &PlanRequest| plan_without_advice(r).is_ok();
    let mut out = Vec::new();
    if req.cache.seq_len > 0 {
        let mut shorter = req.clone();
        shorter.cache.seq_len = 0;
        if fits(&shorter) {
            if let Some((n, _)) = search_max_seq_len(req, req.cache.seq_len) {
                out.push(format!("a shorter cache: --cache-seq-len {n} fits"));
            }
        }
        for dtype in [
            CacheDtype::Fp8,
            CacheDtype::Q8,
            CacheDtype::Q6,
            CacheDtype::Q4,
        ] {
            if dtype.bytes_for(1 << 20) >= req.cache.dtype.bytes_for(1 << 20) {
                continue;
            }
            let mut q = req.clone();
            q.cache.dtype = dtype;
            if fits(&q) {
                out.push(format!(
                    "a quantised cache: --cache-dtype {} fits",
                    dtype.name()
                ));
                break;
            }
        }
    }
    if !req.embedding_on_host && req.units.iter().any(|u| u.kind == UnitKind::Embedding) {
        let mut h = req.clone();
        h.embedding_on_host = true;
        if fits(&h) {
            out.push("the embedding on the host: --embedding-on-host fits".into());
        }
    }
    if matches!(req.strategy, Strategy::Greedy | Strategy::Balanced) {
        if let Some(largest) = req.devices.iter().max_by_key(|d| d.capacity_bytes) {
            let mut more = req.clone();
            for extra in 1..=64 {
                more.devices.push(DeviceSpec {
                    name: format!("extra{extra}"),
                    ..largest.clone()
                });
                if fits(&more) {
                    out.push(format!(
                        "more devices: {extra} more like {} ({}) would fit",
                        largest.name,
                        st_io::format_binary(largest.capacity_bytes)
                    ));
                    break;
                }
            }
        }
    }
    out
}

fn search_max_seq_len(req: &PlanRequest, upper: u64) -> Option<(u64, Plan)> {
    let at = |n: u64| {
        let mut r = req.clone();
        r.cache.seq_len = n;
        plan_without_advice(&r).ok()
    };
    let mut best = at(1).map(|p| (1, p))?;
    let (mut lo, mut hi) = (1u64, upper.max(1));
    if let Some(p) = at(hi) {
        return Some((hi, p));
    }
    // Invariant: lo fits, hi does not.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match at(mid) {
            Some(p) => {
                lo = mid;
                best = (mid, p);
            }
            None => hi = mid,
        }
    }
    Some(best)
}

/// The largest cache sequence length (≤ `upper`, e.g. the model's context length) whose plan
/// fits, with that plan. Fails with `DoesNotFit` when even one token of cache does not fit.
pub fn max_seq_len(req: &PlanRequest, upper: u64) -> Result<(u64, Plan), Error> {
    match search_max_seq_len(req, upper) {
        Some(found) => Ok(found),
        None => {
            let mut one = req.clone();
            one.cache.seq_len = 1;
            plan(&one).map(|p| (1, p))
        }
    }
}
