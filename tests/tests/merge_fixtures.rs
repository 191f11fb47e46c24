//! `weightsmith merge` against PEFT's own `merge_and_unload` on the committed adapter
//! fixtures (scripts/fixtures/make_adapter_fixtures.py): same tensors, same shapes, same dtypes, every
//! value within 1 ulp (a single rounding against PEFT's two; DoRA within 2, see below).
//!
//! The ulp is taken at the scale of max(|W|, |W'|): PEFT rounds ΔW to 16 bits before adding
//! it, so where W and ΔW nearly cancel its error is a fraction of ΔW's ulp, which can be many
//! ulps of the small result (the embedding fixture, with |ΔW| ≫ |W|, shows it). Measured at
//! that scale the two merges differ by at most one ulp; against the exact f64 merge ours is
//! within one ulp of the result itself (`--verify`).

use std::path::PathBuf;

use serde_json::Value;
use st_io::{Checkpoint, Dtype};
use weightsmith::{merge, MergeOptions};
use weightsmith_tests::{compare_with_reference, fixture};

const CASES: &[&str] = &[
    "llama-lora",
    "llama-rslora-f16",
    "gpt2-fan-in-fan-out",
    "llama-dora",
    "llama-embedding-mts",
    "qwen2-tied-bias",
    "llama-two-weighted",
];

/// A fixture case: its case.json and its adapters with their weights.
fn load_case(name: &str) -> (Value, Vec<(PathBuf, f64)>) {
    let dir = fixture(&format!("adapters/{name}"));
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let adapters = case["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .zip(case["weights"].as_array().unwrap())
        .map(|(a, w)| (dir.join(a.as_str().unwrap()), w.as_f64().unwrap()))
        .collect();
    (case, adapters)
}

fn run_case(name: &str, out: &std::path::Path) -> (weightsmith::MergeReport, Value) {
    let (case, adapters) = load_case(name);
    let mut options = MergeOptions::new(adapters, out);
    options.dtype = Some(if case["dtype"] == "float16" {
        Dtype::F16
    } else {
        Dtype::BF16
    });
    options.verify = true;
    let report = merge(
        fixture(case["base"].as_str().unwrap()),
        &options,
        &mut |_| {},
    )
    .unwrap();
    (report, case)
}

#[test]
fn every_case_matches_peft_within_its_ulp_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let mut summary = Vec::new();
    for name in CASES {
        let out = tmp.path().join(name);
        let (report, case) = run_case(name, &out);
        let ours = Checkpoint::open(&out).unwrap();
        let reference = Checkpoint::open(fixture(&format!("adapters/{name}/merged"))).unwrap();
        let base = Checkpoint::open(fixture(case["base"].as_str().unwrap())).unwrap();
        let outcome = compare_with_reference(&ours, &reference, &base);
        // PEFT rounds the delta to 16 bits, then the sum: at most 1 ulp from our single
        // rounding. DoRA: PEFT also rounds ‖W+ΔW‖ and m/‖W+ΔW‖ to 16 bits before scaling, so 2.
        // Two weighted adapters: PEFT's reference (add_weighted_adapter "cat") stores the
        // concatenated w·s·B and A in 16 bits before multiplying, an error of up to ~2⁻⁸ of
        // |ΔW| per element; there the check that matters is ours against the exact f64 merge
        // (`verify` below, at most 1 ulp), and PEFT's is bounded loosely.
        let budget = match *name {
            n if n.contains("dora") => 2,
            "llama-two-weighted" => 96,
            _ => 1,
        };
        assert!(
            outcome.max_ulps <= budget,
            "{name}: {} ulps from PEFT",
            outcome.max_ulps
        );
        assert!(
            outcome.changed > 0,
            "{name}: the reference changed nothing?"
        );
        let verify = report.verify.unwrap();
        assert!(
            verify.rows_checked > 0 && verify.max_ulps <= 1,
            "{name}: verify {verify:?}"
        );
        summary.push(format!(
            "{name}: {} ulp max vs PEFT, verify {} ulp",
            outcome.max_ulps, verify.max_ulps
        ));
    }
    eprintln!("{}", summary.join("\n"));
}

/// With a GPU (scripts/gpu-check.sh), the CUDA merge gives exactly the CPU merge's bytes on
/// every fixture; without one this says so and checks nothing more.
#[test]
fn the_gpu_merge_equals_the_cpu_merge_bit_for_bit() {
    if !weightsmith_tests::gpu_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for name in CASES {
        let (case, adapters) = load_case(name);
        let mut outputs = Vec::new();
        for device in [
            weightsmith::MergeDevice::Cpu,
            weightsmith::MergeDevice::Cuda(0),
        ] {
            let out = tmp.path().join(format!("{name}-{device:?}"));
            let mut options = MergeOptions::new(adapters.clone(), &out);
            options.device = device;
            let report = merge(
                fixture(case["base"].as_str().unwrap()),
                &options,
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(
                report.device == "cpu",
                device == weightsmith::MergeDevice::Cpu
            );
            outputs.push(out);
        }
        let (cpu, gpu) = (
            Checkpoint::open(&outputs[0]).unwrap(),
            Checkpoint::open(&outputs[1]).unwrap(),
        );
        for t in cpu.tensors() {
            let g = gpu.tensor(&t.name).unwrap();
            assert!(
                cpu.tensor_bytes(t) == gpu.tensor_bytes(g),
                "{name}: {} differs between CPU and GPU",
                t.name
            );
        }
    }
}
