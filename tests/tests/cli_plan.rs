//! `weightsmith plan` as a user runs it, on the shipped checkpoints and simulated GPUs.

use serde_json::Value;
use weightsmith_tests::{fixture, weightsmith};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = weightsmith(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn llama() -> String {
    fixture("models/tiny-llama").display().to_string()
}

#[test]
fn plans_the_shipped_checkpoint_on_two_simulated_gpus_as_the_readme_says() {
    let (code, out, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--strategy",
        "balanced",
    ]);
    assert_eq!(code, 0, "{err}");
    for needle in [
        "balanced plan on 2 device(s); KV cache 4096 token(s) × 1 sequence(s) in f16",
        "cuda:0",
        "embedding, layers.0-1",
        "layers.2, norm, head",
        "layers per device: 2, 1",
    ] {
        assert!(out.contains(needle), "{needle:?} not in\n{out}");
    }
}

#[test]
fn prints_the_documented_json() {
    let (code, out, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--json",
        "--cache-seq-len",
        "32",
        "--cache-batch",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["schema_version"], 1);
    assert_eq!(j["strategy"], "greedy");
    assert_eq!(
        j["cache"],
        serde_json::json!({"seq_len": 32, "batch": 2, "dtype": "f16"})
    );
    let devices = j["devices"].as_array().unwrap();
    for d in devices {
        for key in [
            "index",
            "name",
            "capacity_bytes",
            "reserve_bytes",
            "weight_bytes",
            "cache_bytes",
            "overhead_bytes",
            "free_after_bytes",
            "units",
        ] {
            assert!(d.get(key).is_some(), "device has no {key}");
        }
    }
    let units = j["units"].as_array().unwrap();
    assert_eq!(units.len(), 6);
    // tiny-llama: 2 KV heads × head dim 16 → 2 × 2 × 16 × 32 tokens × 2 sequences × 2 bytes.
    let layer = units.iter().find(|u| u["name"] == "layers.1").unwrap();
    assert_eq!(layer["cache_bytes"], 2 * 2 * 16 * 32 * 2 * 2);
    assert_eq!(layer["device"], 0);
    let weights: u64 = units
        .iter()
        .map(|u| u["weight_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(weights, 287616);
    let device_weights: u64 = devices
        .iter()
        .map(|d| d["weight_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(device_weights, weights);
}

#[test]
fn caps_sliding_window_layers_at_the_window() {
    let path = fixture("models/tiny-mistral").display().to_string();
    let (code, out, err) = run(&[
        "plan",
        &path,
        "--devices",
        "1GiB",
        "--json",
        "--cache-seq-len",
        "64",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    // Window 16: 2 × 2 kv heads × head dim 8 × 16 positions × 2 bytes.
    let layer = j["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "layers.0")
        .unwrap()
        .clone();
    assert_eq!(layer["cache_bytes"], 2 * 2 * 8 * 16 * 2);
}

#[test]
fn refuses_what_does_not_fit_with_an_explanation() {
    let (code, out, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "400MiB",
        "--overhead",
        "0",
        "--cache-seq-len",
        "10000000",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: the model does not fit: it needs"),
        "{err}"
    );
    assert!(err.contains("was the first unit that did not fit"), "{err}");
    assert!(err.contains("--cache-seq-len"), "{err}");
}

#[test]
fn finds_the_largest_cache_that_fits() {
    let (code, out, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1MiB",
        "--overhead",
        "0",
        "--cache-seq-len",
        "max",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["seq_len_is_max"], true);
    // 1 MiB − 287616 weight bytes, 3 layers × 2 KiB... → whatever fits, capped at 64 positions.
    let n = j["cache"]["seq_len"].as_u64().unwrap();
    assert_eq!(n, 64, "max_position_embeddings caps the search");
    let (code, out, _) = run(&[
        "plan",
        &llama(),
        "--devices",
        "300KB",
        "--overhead",
        "0",
        "--cache-seq-len",
        "max",
        "--json",
    ]);
    assert_eq!(code, 0);
    let j: Value = serde_json::from_str(&out).unwrap();
    let n = j["cache"]["seq_len"].as_u64().unwrap();
    assert!(n > 0 && n < 64, "{n}");
    let (code, _, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "300KB",
        "--overhead",
        "0",
        "--cache-seq-len",
        &(n + 1).to_string(),
    ]);
    assert_eq!(code, 1, "one more token must not fit: {err}");
}

#[test]
fn exports_for_vllm_and_accelerate() {
    let (code, out, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--strategy",
        "balanced",
        "--export",
        "vllm",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("export VLLM_PP_LAYER_PARTITION=2,1\n"),
        "{out}"
    );
    assert!(out.contains("--pipeline-parallel-size 2"), "{out}");
    let (code, out, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--strategy",
        "balanced",
        "--export",
        "accelerate",
        "--embedding-on-host",
    ]);
    assert_eq!(code, 0, "{err}");
    let map: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(map["model.embed_tokens"], "cpu");
    assert_eq!(map["model.layers.0"], 0);
    assert_eq!(map["model.layers.2"], 1);
    assert_eq!(map["model.norm"], 1);
    assert_eq!(map["lm_head"], 1);
    assert_eq!(map.as_object().unwrap().len(), 6);
    // vLLM cannot express a stage without layers.
    let (code, _, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--export",
        "vllm",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("vLLM's pipeline stages cannot express"),
        "{err}"
    );
}

#[test]
fn follows_manual_splits() {
    let (code, out, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--split-layers",
        "1,2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["strategy"], "manual");
    let devices: Vec<Value> = j["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["device"].clone())
        .collect();
    assert_eq!(devices, [0, 0, 1, 1, 1, 1].map(Value::from));
    let (code, _, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--split",
        "0.5,0.5",
        "--overhead",
        "0",
    ]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn rejects_bad_options_with_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--devices", "24GiB", "--cache-dtype", "int4"],
            "--cache-dtype must be one of f16, bf16, fp8, q8, q6, q4, not \"int4\"",
        ),
        (
            &["--devices", "24GiB", "--strategy", "manual"],
            "--strategy manual needs --split or --split-layers",
        ),
        (
            &[
                "--devices",
                "24GiB",
                "--strategy",
                "balanced",
                "--split",
                "20",
            ],
            "--split and --split-layers are for --strategy manual",
        ),
        (
            &["--devices", "24GiB,24GiB", "--reserve", "1GiB,1GiB,1GiB"],
            "--reserve has 3 values for 2 devices",
        ),
        (
            &["--devices", "24GiB", "--reserve", "30GiB"],
            "device cuda:0: reserve of 30.00 GiB is more than its 24.00 GiB of capacity",
        ),
        (&["--devices", "24 parsecs"], "invalid size \"24 parsecs\""),
        (
            &["--devices", "24GiB", "--cache-seq-len", "lots"],
            "--cache-seq-len must be a number of tokens or max",
        ),
        (
            &["--devices", "24GiB,24GiB", "--split-layers", "1,1"],
            "the layer split places 2 layers but the model has 3",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["plan", "PATH"];
        let l = llama();
        args[1] = &l;
        args.extend_from_slice(extra);
        let (code, out, err) = run(&args);
        assert_eq!(code, 1, "{extra:?}: {out}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{extra:?}: {needle:?} not in {err}");
    }
}

#[test]
fn auto_devices_are_this_machines_gpus_or_a_clear_message() {
    let gpus = weightsmith::gpu_mem::discover().unwrap();
    let (code, out, err) = run(&["plan", &llama(), "--json"]);
    if gpus.is_empty() {
        assert_eq!(code, 1);
        assert!(
            err.contains("--devices auto found no GPU (no NVIDIA driver on this machine)"),
            "{err}"
        );
    } else {
        assert_eq!(code, 0, "{err}");
        let j: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["devices"].as_array().unwrap().len(), gpus.len());
        assert_eq!(j["devices"][0]["name"], "cuda:0");
        assert_eq!(j["devices"][0]["capacity_bytes"], gpus[0].free_bytes);
    }
}

/// Sizes past u64 are refused as not fitting, never wrapped into a small plan, and `load` does
/// not abort on them (issue #26's repros).
#[test]
fn a_cache_past_u64_is_refused_not_wrapped() {
    let model = fixture("models/tiny-llama");
    let model = model.to_str().unwrap();
    let o = weightsmith(&[
        "plan",
        model,
        "--devices",
        "1GiB",
        "--cache-seq-len",
        "18446744073709551615",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("does not fit"), "{err}");
    let o = weightsmith(&["load", model, "--cache-seq-len", "18446744073709551615"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A plan printed with `--json` (edited by hand) and an accelerate map from `--export
/// accelerate` both come back through `--device-map` as the same placement.
#[test]
fn device_maps_from_a_plan_or_accelerate_place_what_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--strategy",
        "balanced",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let mut plan: Value = serde_json::from_str(&out).unwrap();
    // Move layers.1 to device 1 by hand, and the head to the host.
    for unit in plan["units"].as_array_mut().unwrap() {
        match unit["name"].as_str().unwrap() {
            "layers.1" => unit["device"] = 1.into(),
            "head" => unit["device"] = "host".into(),
            _ => {}
        }
    }
    let plan_file = dir.path().join("plan.json");
    std::fs::write(&plan_file, plan.to_string()).unwrap();
    let (code, out, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--device-map",
        plan_file.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let fixed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(fixed["strategy"], "fixed");
    let placed: Vec<(String, Value)> = fixed["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["name"].as_str().unwrap().to_string(), u["device"].clone()))
        .collect();
    let want: Vec<(String, Value)> = [
        ("embedding", Value::from(0)),
        ("layers.0", 0.into()),
        ("layers.1", 1.into()),
        ("layers.2", 1.into()),
        ("norm", 1.into()),
        ("head", "host".into()),
    ]
    .into_iter()
    .map(|(n, d)| (n.to_string(), d))
    .collect();
    assert_eq!(placed, want);
    assert_eq!(
        fixed["devices"][1]["units"],
        serde_json::json!(["layers.1", "layers.2", "norm"])
    );

    // accelerate's form, exported by `plan`, comes back to the same plan.
    let (code, exported, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--strategy",
        "balanced",
        "--export",
        "accelerate",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, again, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--device-map",
        &exported,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, balanced, _) = run(&[
        "plan",
        &llama(),
        "--devices",
        "1GiB,1GiB",
        "--strategy",
        "balanced",
        "--json",
    ]);
    let (again, balanced): (Value, Value) = (
        serde_json::from_str(&again).unwrap(),
        serde_json::from_str(&balanced).unwrap(),
    );
    assert_eq!(again["units"], balanced["units"]);
    assert_eq!(again["devices"], balanced["devices"]);
}

#[test]
fn bad_device_maps_are_refused_naming_the_unit_or_module() {
    for (map, needle) in [
        (
            r#"{"model.embed_tokens": 0, "model.layers.0": 0}"#,
            "no device for module \"model.layers.1\" (unit \"layers.1\")",
        ),
        (
            r#"{"": 2}"#,
            "puts \"embedding\" on device 2, but there are 2 devices (cuda:0, cuda:1)",
        ),
        (
            r#"{"": 0, "model.layers.1.mlp": 1}"#,
            "splits unit \"layers.1\"",
        ),
        (r#"{"": "disk"}"#, "on \"disk\""),
        (r#"{"": 0, "lm_head": 1}"#, ""),
    ] {
        let (code, _, err) = run(&[
            "plan",
            &llama(),
            "--devices",
            "1GiB,1GiB",
            "--device-map",
            map,
        ]);
        if needle.is_empty() {
            assert_eq!(code, 0, "{map}: {err}");
            continue;
        }
        assert_eq!(code, 1, "{map}");
        assert!(err.contains(needle), "{map}: {err}");
    }
    let (code, _, err) = run(&[
        "plan",
        &llama(),
        "--devices",
        "64MiB",
        "--device-map",
        r#"{"": 0}"#,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("does not fit"), "{err}");
    let (code, _, err) = run(&[
        "plan",
        &llama(),
        "--device-map",
        "/nonexistent/map.json",
        "--devices",
        "1GiB",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/map.json"), "{err}");
    let (code, _, err) = run(&[
        "plan",
        &llama(),
        "--device-map",
        r#"{"": 0}"#,
        "--strategy",
        "balanced",
    ]);
    assert_eq!(code, 2, "{err}");
}
