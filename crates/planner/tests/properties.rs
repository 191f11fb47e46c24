//! The planner's invariants on random layouts and devices.

use planner::{
    plan, CacheDtype, CacheSpec, DeviceSpec, Error, ModelDims, Placement, Plan, PlanRequest,
    Strategy as Policy, UnitSpec,
};
use proptest::prelude::*;
use st_io::layout::UnitKind;

fn units_strategy() -> impl Strategy<Value = Vec<UnitSpec>> {
    (
        prop::option::of(0u64..800),
        prop::collection::vec(0u64..500, 0..10),
        prop::option::of(0u64..20),
        prop::option::of(0u64..800),
        prop::option::of(0u64..300),
    )
        .prop_map(|(embedding, layers, norm, head, other)| {
            let mut units = Vec::new();
            if let Some(b) = embedding {
                units.push(UnitSpec {
                    name: "embedding".into(),
                    kind: UnitKind::Embedding,
                    weight_bytes: b,
                });
            }
            for (i, b) in layers.into_iter().enumerate() {
                units.push(UnitSpec {
                    name: format!("layers.{i}"),
                    kind: UnitKind::Layer(i as u64),
                    weight_bytes: b,
                });
            }
            if let Some(b) = norm {
                units.push(UnitSpec {
                    name: "norm".into(),
                    kind: UnitKind::Norm,
                    weight_bytes: b,
                });
            }
            if let Some(b) = head {
                units.push(UnitSpec {
                    name: "head".into(),
                    kind: UnitKind::Head,
                    weight_bytes: b,
                });
            }
            if let Some(b) = other {
                units.push(UnitSpec {
                    name: "other".into(),
                    kind: UnitKind::Other,
                    weight_bytes: b,
                });
            }
            units
        })
}

/// Devices `cuda:0…` from (capacity, reserve, overhead); a reserve is at most the capacity.
fn gpus(specs: impl IntoIterator<Item = (u64, u64, Option<u64>)>) -> Vec<DeviceSpec> {
    specs
        .into_iter()
        .enumerate()
        .map(|(i, (cap, reserve, overhead))| DeviceSpec {
            name: format!("cuda:{i}"),
            capacity_bytes: cap,
            reserve_bytes: reserve.min(cap),
            overhead_bytes: overhead,
        })
        .collect()
}

fn request_strategy(max_devices: usize) -> impl Strategy<Value = PlanRequest> {
    (
        units_strategy(),
        (1u64..3, 1u64..5, prop::option::of(1u64..16)),
        (
            0u64..24,
            1u64..3,
            prop::sample::select(CacheDtype::ALL.to_vec()),
        ),
        prop::collection::vec((0u64..3000, 0u64..400, 0u64..200), 1..=max_devices),
        any::<bool>(),
    )
        .prop_map(
            |(units, (kv_heads, head_dim, window), (seq_len, batch, dtype), devices, on_host)| {
                PlanRequest {
                    units,
                    dims: ModelDims {
                        kv_heads,
                        head_dim,
                        // vocab 0: no logits scratch, so loads are weights + cache exactly.
                        vocab_size: 0,
                        sliding_window: window,
                        ..ModelDims::default()
                    },
                    cache: CacheSpec {
                        seq_len,
                        batch,
                        dtype,
                    },
                    devices: gpus(
                        devices
                            .into_iter()
                            .map(|(cap, reserve, overhead)| (cap, reserve, Some(overhead))),
                    ),
                    strategy: Policy::Greedy,
                    embedding_on_host: on_host,
                }
            },
        )
}

fn with(req: &PlanRequest, strategy: Policy) -> PlanRequest {
    PlanRequest {
        strategy,
        ..req.clone()
    }
}

/// Room for units; -1 when the overhead alone does not fit (the device takes nothing).
fn budget(d: &DeviceSpec) -> i128 {
    let usable = d.capacity_bytes - d.reserve_bytes;
    let overhead = d.overhead_bytes.unwrap();
    if overhead > usable {
        -1
    } else {
        (usable - overhead) as i128
    }
}

/// Load of each device as the objective sees it (weights + cache), and its budget.
fn loads(req: &PlanRequest, p: &Plan) -> Vec<(u64, u64)> {
    p.devices
        .iter()
        .zip(&req.devices)
        .map(|(d, spec)| (d.weight_bytes + d.cache_bytes, budget(spec).max(0) as u64))
        .collect()
}

/// max load/budget as an exact fraction, compared by cross-multiplication.
fn worst(loads: &[(u64, u64)]) -> (u128, u128) {
    let mut w = (0u128, 1u128);
    for &(l, b) in loads {
        if l == 0 {
            continue;
        }
        let r = (l as u128, b.max(1) as u128);
        if r.0 * w.1 > w.0 * r.1 {
            w = r;
        }
    }
    w
}

/// Groups of the reference: built independently from the unit list.
fn reference_groups(req: &PlanRequest) -> Vec<(Vec<usize>, u64)> {
    let cache = |u: &UnitSpec| match u.kind {
        UnitKind::Layer(i) => req.dims.cache_bytes(i, &req.cache),
        _ => 0,
    };
    let emb: u64 = req
        .units
        .iter()
        .filter(|u| u.kind == UnitKind::Embedding)
        .map(|u| u.weight_bytes)
        .sum();
    let weight = |u: &UnitSpec| {
        if u.kind == UnitKind::Head && u.weight_bytes == 0 && req.embedding_on_host {
            emb
        } else {
            u.weight_bytes
        }
    };
    let last_layer = req
        .units
        .iter()
        .rposition(|u| matches!(u.kind, UnitKind::Layer(_)));
    let mut groups: Vec<(Vec<usize>, u64)> = Vec::new();
    let mut tail: Vec<usize> = Vec::new();
    let mut others = Vec::new();
    for (i, u) in req.units.iter().enumerate() {
        let cost = weight(u) + cache(u);
        match u.kind {
            UnitKind::Embedding if req.embedding_on_host => {}
            UnitKind::Other => others.push((vec![i], cost)),
            UnitKind::Norm | UnitKind::Head => tail.push(i),
            UnitKind::Layer(_) if Some(i) == last_layer => tail.push(i),
            _ => groups.push((vec![i], cost)),
        }
    }
    if !tail.is_empty() {
        let cost = tail
            .iter()
            .map(|&i| weight(&req.units[i]) + cache(&req.units[i]))
            .sum();
        groups.push((tail, cost));
    }
    groups.extend(others);
    groups
}

/// exllamav2's load_autosplit, restated: for each module, while it does not fit in what is
/// left on the current device, move to the next device; fail past the last one.
fn exllamav2_autosplit(req: &PlanRequest) -> Option<Vec<Placement>> {
    let mut placement = vec![Placement::Host; req.units.len()];
    let mut free: Vec<i128> = req.devices.iter().map(budget).collect();
    let mut current = 0;
    for (ids, cost) in reference_groups(req) {
        loop {
            if current >= free.len() {
                return None;
            }
            if (cost as i128) <= free[current] {
                free[current] -= cost as i128;
                break;
            }
            current += 1;
        }
        for i in ids {
            placement[i] = Placement::Device(current);
        }
    }
    Some(placement)
}

/// The best worst-ratio over every contiguous split of the groups into the devices.
fn brute_force_optimum(req: &PlanRequest) -> Option<(u128, u128)> {
    let groups = reference_groups(req);
    let budgets: Vec<i128> = req.devices.iter().map(budget).collect();
    fn go(
        groups: &[(Vec<usize>, u64)],
        budgets: &[i128],
        start: usize,
        device: usize,
        acc: Vec<(u64, u64)>,
        best: &mut Option<(u128, u128)>,
    ) {
        if device == budgets.len() {
            if start == groups.len() {
                let w = worst(&acc);
                if best.is_none_or(|b| w.0 * b.1 < b.0 * w.1) {
                    *best = Some(w);
                }
            }
            return;
        }
        let mut load = 0;
        for end in start..=groups.len() {
            if end > start {
                load += groups[end - 1].1;
            }
            // An unusable device (budget -1) can only take the empty range.
            if end > start && load as i128 > budgets[device] {
                break;
            }
            let mut next = acc.clone();
            next.push((load, budgets[device].max(0) as u64));
            go(groups, budgets, end, device + 1, next, best);
        }
    }
    let mut best = None;
    go(&groups, &budgets, 0, 0, Vec::new(), &mut best);
    best
}

fn check_invariants(req: &PlanRequest, p: &Plan) -> Result<(), TestCaseError> {
    // Every unit placed exactly once, in input order.
    prop_assert_eq!(p.units.len(), req.units.len());
    for (pu, u) in p.units.iter().zip(&req.units) {
        prop_assert_eq!(&pu.name, &u.name);
    }
    // Each device's unit list is exactly the units planned on it; contiguous, in model order.
    let mut last_device = 0;
    for (i, pu) in p.units.iter().enumerate() {
        match pu.device {
            Placement::Device(d) => {
                prop_assert!(
                    d >= last_device,
                    "unit {} goes back to device {}",
                    pu.name,
                    d
                );
                last_device = d;
                prop_assert!(p.devices[d].units.contains(&pu.name));
            }
            Placement::Host => {
                prop_assert!(req.embedding_on_host && req.units[i].kind == UnitKind::Embedding)
            }
        }
    }
    let listed: usize = p.devices.iter().map(|d| d.units.len()).sum();
    prop_assert_eq!(
        listed,
        p.units
            .iter()
            .filter(|u| u.device != Placement::Host)
            .count()
    );
    for (d, spec) in p.devices.iter().zip(&req.devices) {
        // Nothing over capacity − reserve.
        prop_assert!(
            d.weight_bytes + d.cache_bytes + d.overhead_bytes
                <= spec.capacity_bytes - spec.reserve_bytes
        );
        prop_assert_eq!(
            d.free_after_bytes,
            spec.capacity_bytes
                - spec.reserve_bytes
                - d.weight_bytes
                - d.cache_bytes
                - d.overhead_bytes
        );
        // Each layer's cache on its layer's device, counted cumulatively.
        let cache: u64 = p
            .units
            .iter()
            .filter(|u| u.device == Placement::Device(d.index))
            .map(|u| u.cache_bytes)
            .sum();
        prop_assert_eq!(d.cache_bytes, cache);
    }
    for (pu, u) in p.units.iter().zip(&req.units) {
        if let UnitKind::Layer(i) = u.kind {
            prop_assert_eq!(pu.cache_bytes, req.dims.cache_bytes(i, &req.cache));
        } else {
            prop_assert_eq!(pu.cache_bytes, 0);
        }
    }
    // The head goes with the last layer.
    let last_layer = req
        .units
        .iter()
        .rposition(|u| matches!(u.kind, UnitKind::Layer(_)));
    let head = req.units.iter().position(|u| u.kind == UnitKind::Head);
    if let (Some(l), Some(h)) = (last_layer, head) {
        prop_assert_eq!(p.units[l].device, p.units[h].device);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn greedy_plans_keep_every_invariant_and_match_exllamav2(req in request_strategy(4)) {
        let reference = exllamav2_autosplit(&req);
        match plan(&req) {
            Ok(p) => {
                check_invariants(&req, &p)?;
                let placements: Vec<Placement> = p.units.iter().map(|u| u.device).collect();
                prop_assert_eq!(Some(placements), reference);
            }
            Err(Error::DoesNotFit { .. }) => prop_assert!(reference.is_none()),
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }

    #[test]
    fn the_same_input_always_gives_the_same_plan(req in request_strategy(4), balanced in any::<bool>()) {
        let req = if balanced { with(&req, Policy::Balanced) } else { req };
        prop_assert_eq!(plan(&req), plan(&req.clone()));
    }

}

/// Runs `property` on `cases` inputs drawn from `strategy` (shrinking a failure as proptest
/// does); the property returns whether the input reached what it checks (a precondition
/// that held). Prints how many did, and fails when fewer than half did: a property that
/// holds vacuously is a failing test, not a passing one.
fn reaching<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) {
    use proptest::test_runner::{Config, TestRunner};
    use std::sync::atomic::{AtomicU32, Ordering};
    let reached = AtomicU32::new(0);
    let runs = AtomicU32::new(0);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, |v| {
        runs.fetch_add(1, Ordering::Relaxed);
        if property(v)? {
            reached.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }) {
        panic!("{name}: {e}");
    }
    let (reached, runs) = (reached.into_inner(), runs.into_inner());
    eprintln!("{name}: {reached} of {runs} cases reached the property");
    assert!(
        2 * reached >= runs,
        "{name}: only {reached} of {runs} cases reached the property"
    );
}

/// Requests that fit by construction (most of the time, for greedy as well): each device's
/// room is its share of the model's whole load plus the largest group, so greedy, which
/// leaves less than one group unused per device, places everything. Capacities keep the
/// generated reserve and overhead; the generated capacity becomes the device's share.
fn fitting_request(max_devices: usize) -> impl Strategy<Value = PlanRequest> {
    request_strategy(max_devices).prop_map(|mut req| {
        let total: u128 = unit_loads(&req).iter().sum();
        let largest = reference_groups(&req)
            .iter()
            .map(|(_, c)| *c as u128)
            .max()
            .unwrap_or(0);
        let shares: u128 = req
            .devices
            .iter()
            .map(|d| d.capacity_bytes as u128 + 1)
            .sum();
        for d in &mut req.devices {
            let share = total * (d.capacity_bytes as u128 + 1) / shares + 1;
            d.capacity_bytes =
                d.reserve_bytes + d.overhead_bytes.unwrap() + (share + largest) as u64;
        }
        req
    })
}

/// Requests in which every device could hold the whole model: any split fits.
fn roomy_request(max_devices: usize) -> impl Strategy<Value = PlanRequest> {
    request_strategy(max_devices).prop_map(|mut req| {
        let total: u128 = unit_loads(&req).iter().sum();
        for d in &mut req.devices {
            d.capacity_bytes = d.reserve_bytes + d.overhead_bytes.unwrap() + total as u64;
        }
        req
    })
}

#[test]
fn balanced_is_optimal_and_never_worse_than_greedy() {
    reaching(
        "balanced_is_optimal_and_never_worse_than_greedy",
        400,
        // Random requests too, where the two strategies must agree that nothing fits.
        prop_oneof![fitting_request(3), request_strategy(3)],
        |req| {
            let balanced = plan(&with(&req, Policy::Balanced));
            let greedy = plan(&req);
            prop_assert_eq!(
                balanced.is_ok(),
                greedy.is_ok(),
                "feasibility is the same question"
            );
            let (Ok(b), Ok(g)) = (balanced, greedy) else {
                return Ok(false);
            };
            check_invariants(&req, &b)?;
            let (wb, wg) = (worst(&loads(&req, &b)), worst(&loads(&req, &g)));
            prop_assert!(
                wb.0 * wg.1 <= wg.0 * wb.1,
                "balanced {wb:?} worse than greedy {wg:?}"
            );
            let optimum = brute_force_optimum(&req).expect("greedy fit, so some split fits");
            prop_assert_eq!(
                wb.0 * optimum.1,
                optimum.0 * wb.1,
                "balanced {:?} vs optimum {:?}",
                wb,
                optimum
            );
            Ok(true)
        },
    );
}

#[test]
fn adding_capacity_never_turns_a_fit_into_a_no_fit() {
    reaching(
        "adding_capacity_never_turns_a_fit_into_a_no_fit",
        400,
        (
            prop_oneof![fitting_request(3), request_strategy(3)],
            any::<prop::sample::Index>(),
            0u64..5000,
            any::<bool>(),
        ),
        |(req, device, extra, balanced)| {
            let req = if balanced {
                with(&req, Policy::Balanced)
            } else {
                req
            };
            if plan(&req).is_err() {
                return Ok(false);
            }
            let mut bigger = req.clone();
            let d = device.index(bigger.devices.len());
            bigger.devices[d].capacity_bytes += extra;
            prop_assert!(plan(&bigger).is_ok());
            Ok(true)
        },
    );
}

/// A device map copied from any plan gives that plan back (a map exported by `plan` and
/// handed to `load` places exactly what `plan` said).
#[test]
fn a_fixed_map_taken_from_a_plan_gives_that_plan() {
    reaching(
        "a_fixed_map_taken_from_a_plan_gives_that_plan",
        400,
        (fitting_request(3), any::<bool>()),
        |(req, balanced)| {
            let req = if balanced {
                with(&req, Policy::Balanced)
            } else {
                req
            };
            let Ok(p) = plan(&req) else {
                return Ok(false);
            };
            let placements: Vec<Placement> = p.units.iter().map(|u| u.device).collect();
            let fixed =
                plan(&with(&req, Policy::Fixed(placements))).expect("the plan's own map fits");
            prop_assert_eq!(fixed.units, p.units);
            prop_assert_eq!(fixed.devices, p.devices);
            prop_assert_eq!(fixed.host_bytes, p.host_bytes);
            Ok(true)
        },
    );
}

#[test]
fn manual_layer_splits_place_what_they_say() {
    reaching(
        "manual_layer_splits_place_what_they_say",
        400,
        (
            roomy_request(3),
            prop::collection::vec(any::<prop::sample::Index>(), 2),
        ),
        |(req, cuts)| {
            let layers = req
                .units
                .iter()
                .filter(|u| matches!(u.kind, UnitKind::Layer(_)))
                .count() as u64;
            let n = req.devices.len();
            let mut bounds: Vec<u64> = cuts
                .iter()
                .take(n - 1)
                .map(|c| c.index(layers as usize + 1) as u64)
                .collect();
            bounds.sort();
            bounds.insert(0, 0);
            bounds.push(layers);
            let counts: Vec<u64> = bounds.windows(2).map(|w| w[1] - w[0]).collect();
            // Every device could hold the whole model: the split must be accepted.
            let p = plan(&with(&req, Policy::ManualLayers(counts.clone()))).map_err(|e| {
                TestCaseError::fail(format!("{counts:?} refused on roomy devices: {e}"))
            })?;
            check_invariants(&req, &p)?;
            prop_assert_eq!(p.layers_per_device(), counts);
            Ok(true)
        },
    );
}

/// Requests whose every number ranges over all of u64: sizes from a file, a flag or a device.
fn huge_request() -> impl Strategy<Value = PlanRequest> {
    let any_u64 = prop_oneof![any::<u64>(), 0u64..4096, Just(u64::MAX), Just(u64::MAX / 2)];
    (
        prop::collection::vec(any_u64.clone(), 0..6),
        (
            any_u64.clone(),
            any_u64.clone(),
            any_u64.clone(),
            any_u64.clone(),
            any_u64.clone(),
        ),
        (
            any_u64.clone(),
            any_u64.clone(),
            prop::sample::select(CacheDtype::ALL.to_vec()),
        ),
        prop::collection::vec(
            (any_u64.clone(), any_u64.clone(), prop::option::of(any_u64)),
            1..4,
        ),
        prop::sample::select(vec![Policy::Greedy, Policy::Balanced]),
    )
        .prop_map(
            |(
                layers,
                (kv, hd, hidden, inter, vocab),
                (seq_len, batch, dtype),
                devices,
                strategy,
            )| {
                let mut units: Vec<UnitSpec> = layers
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| UnitSpec {
                        name: format!("layers.{i}"),
                        kind: UnitKind::Layer(i as u64),
                        weight_bytes: b,
                    })
                    .collect();
                units.push(UnitSpec {
                    name: "head".into(),
                    kind: UnitKind::Head,
                    weight_bytes: vocab,
                });
                PlanRequest {
                    units,
                    dims: ModelDims {
                        kv_heads: kv,
                        head_dim: hd,
                        hidden_size: hidden,
                        intermediate_size: inter,
                        vocab_size: vocab,
                        ..ModelDims::default()
                    },
                    cache: CacheSpec {
                        seq_len,
                        batch,
                        dtype,
                    },
                    devices: gpus(devices),
                    strategy,
                    embedding_on_host: false,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the numbers, the planner answers (no panic, no wrapped size), and a plan that
    /// says it fits does fit: each device's units, cache and overhead, summed in u128, are
    /// within its capacity after the reserve.
    #[test]
    fn plans_over_the_whole_u64_range_never_panic_and_fit_when_they_say_so(req in huge_request()) {
        if let Ok(p) = plan(&req) {
            for d in &p.devices {
                let mut sum: u128 = d.reserve_bytes as u128 + d.overhead_bytes as u128;
                for u in p.units.iter().filter(|u| u.device == Placement::Device(d.index)) {
                    sum += u.weight_bytes as u128 + u.cache_bytes as u128;
                }
                prop_assert!(sum <= d.capacity_bytes as u128, "{} holds {} of {}", d.name, sum, d.capacity_bytes);
                prop_assert_eq!(d.weight_bytes as u128 + d.cache_bytes as u128 + d.overhead_bytes as u128 + d.reserve_bytes as u128 + d.free_after_bytes as u128, d.capacity_bytes as u128);
            }
        }
    }
}

/// Weights + cache of each unit as a device holds it (a tied head's copy when the embedding
/// stays on the host), recomputed here in u128.
fn unit_loads(req: &PlanRequest) -> Vec<u128> {
    let embedding: u128 = req
        .units
        .iter()
        .filter(|u| u.kind == UnitKind::Embedding)
        .map(|u| u.weight_bytes as u128)
        .sum();
    req.units
        .iter()
        .map(|u| {
            let weights =
                if u.kind == UnitKind::Head && u.weight_bytes == 0 && req.embedding_on_host {
                    embedding
                } else {
                    u.weight_bytes as u128
                };
            let cache = match u.kind {
                UnitKind::Layer(i) => req.dims.cache_bytes(i, &req.cache) as u128,
                _ => 0,
            };
            weights + cache
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Any placement, contiguous or not: accepted exactly when every device's units, caches,
    /// overhead and (on the head's device) the head's scratch fit its room, recomputed in u128.
    #[test]
    fn a_fixed_map_fits_exactly_when_every_device_holds_its_units(req in request_strategy(3), picks in prop::collection::vec(0usize..4, 64)) {
        let n = req.devices.len();
        // 0..n a device, n and above the host.
        let placements: Vec<Placement> = req.units.iter().zip(picks.iter().cycle())
            .map(|(_, &k)| if k < n { Placement::Device(k) } else { Placement::Host })
            .collect();
        let loads = unit_loads(&req);
        let head_scratch = planner::cache::head_scratch_bytes(&req.dims, &req.cache) as u128;
        let mut used = vec![0u128; n];
        let mut holds = vec![false; n];
        for (i, (u, place)) in req.units.iter().zip(&placements).enumerate() {
            if let Placement::Device(d) = place {
                used[*d] += loads[i] + if u.kind == UnitKind::Head { head_scratch } else { 0 };
                holds[*d] = true;
            }
        }
        // An unused device needs nothing; a used one its overhead besides its units.
        let fits = req.devices.iter().zip(&used).zip(&holds).all(|((d, &u), &holds)| {
            let room = d.capacity_bytes as u128 - d.reserve_bytes as u128;
            let overhead = d.overhead_bytes.unwrap() as u128;
            !holds || (overhead <= room && u <= room - overhead)
        });
        match plan(&with(&req, Policy::Fixed(placements.clone()))) {
            Ok(p) => {
                prop_assert!(fits, "accepted a map that overflows a device: {used:?}");
                let got: Vec<Placement> = p.units.iter().map(|u| u.device).collect();
                prop_assert_eq!(got, placements);
                for (d, dev) in p.devices.iter().enumerate() {
                    let listed: Vec<&String> = p.units.iter().filter(|u| u.device == Placement::Device(d)).map(|u| &u.name).collect();
                    prop_assert_eq!(dev.units.iter().collect::<Vec<_>>(), listed);
                }
            }
            Err(Error::DoesNotFit { .. }) => prop_assert!(!fits, "refused a map that fits: {used:?}"),
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }
}

#[test]
fn a_fixed_map_naming_a_missing_device_or_the_wrong_unit_count_is_refused() {
    let units = vec![
        UnitSpec {
            name: "embed".into(),
            kind: UnitKind::Embedding,
            weight_bytes: 10,
        },
        UnitSpec {
            name: "layers.0".into(),
            kind: UnitKind::Layer(0),
            weight_bytes: 10,
        },
    ];
    let req = PlanRequest {
        units,
        dims: ModelDims::default(),
        cache: CacheSpec {
            seq_len: 0,
            batch: 1,
            dtype: CacheDtype::F16,
        },
        devices: gpus([(1000, 0, Some(0))]),
        strategy: Policy::Fixed(vec![Placement::Device(0), Placement::Device(1)]),
        embedding_on_host: false,
    };
    let e = plan(&req).unwrap_err();
    assert!(
        matches!(e, Error::UnknownDevice { ref unit, device: 1, .. } if unit == "layers.0"),
        "{e}"
    );
    assert!(e.to_string().contains("is one device"), "{e}");
    let e = plan(&with(&req, Policy::Fixed(vec![Placement::Device(0)]))).unwrap_err();
    assert_eq!(
        e,
        Error::PlacementLength {
            entries: 1,
            units: 2
        }
    );
}
