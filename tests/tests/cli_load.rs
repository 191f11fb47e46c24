//! `weightsmith load` on a machine without a GPU: the host twin of the whole load path, the
//! path CI runs (the GPU path runs in scripts/device/load-bench.sh and compares the same way).

use serde_json::Value;
use weightsmith::gpu_mem::Device;
use weightsmith::{load, LoadOptions};
use weightsmith_tests::{copy_fixture, fixture, weightsmith, MODELS};

#[test]
fn loads_every_fixture_and_reads_back_the_file_bytes() {
    if !weightsmith::gpu_mem::discover().unwrap().is_empty() {
        eprintln!("a GPU is present: this test covers the host twin only");
    }
    for name in MODELS {
        let options = LoadOptions {
            verify: true,
            ..LoadOptions::default()
        };
        let loaded = load(fixture(&format!("models/{name}")), &options, &mut |_| {}).unwrap();
        let r = &loaded.report;
        assert_eq!(r.verified_tensors, Some(loaded.tensors.len()), "{name}");
        let ckpt = st_io::Checkpoint::open(fixture(&format!("models/{name}"))).unwrap();
        assert_eq!(loaded.tensors.len(), ckpt.tensors().len());
        for t in ckpt.tensors() {
            let l = loaded.tensor(&t.name).unwrap();
            assert_eq!((l.dtype, &l.shape), (t.dtype, &t.shape));
            assert_eq!(
                l.buffer.read_back().unwrap(),
                ckpt.tensor_bytes(t),
                "{name}: {}",
                t.name
            );
        }
        // Each layer's cache lives on its layer's device, one per layer.
        let layers = ckpt.layout().layer_count();
        assert_eq!(loaded.caches.len(), layers, "{name}");
        for c in &loaded.caches {
            let layer_tensor = loaded
                .tensors
                .iter()
                .find(|t| t.name.contains(&format!(".{}.", c.layer)))
                .unwrap();
            assert_eq!(c.device, layer_tensor.device);
            assert!(!c.buffer.is_empty());
        }
        if loaded.tensors[0].device == Device::Host {
            assert!(r.files.iter().all(|(_, p)| p == "host"));
            assert_eq!(r.backend, "host (no NVIDIA driver)");
        }
    }
}

#[test]
fn the_cli_loads_and_reports() {
    let out = weightsmith(&[
        "load",
        fixture("models/tiny-llama").to_str().unwrap(),
        "--verify",
        "--json",
        "--cache-seq-len",
        "32",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["verified_tensors"], 30);
    assert_eq!(r["weight_bytes"], 287616);
    // 3 layers × 2 × 2 kv heads × 16 × 32 tokens × 2 bytes.
    assert_eq!(r["cache_bytes"], 3 * 2 * 2 * 16 * 32 * 2);
    let d = &r["devices"][0];
    assert_eq!(d["allocated_bytes"], d["planned_bytes"]);
    assert_eq!(r["plan"]["strategy"], "greedy");
}

#[test]
fn refuses_options_that_do_not_apply_and_bad_checkpoints() {
    let llama = fixture("models/tiny-llama").display().to_string();
    for (args, needle) in [
        (
            vec!["load", llama.as_str(), "--devices", "24GiB"],
            "load uses this machine's devices",
        ),
        (
            vec!["load", llama.as_str(), "--export", "vllm"],
            "--export is for `weightsmith plan`",
        ),
    ] {
        let out = weightsmith(&args);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle), "{err}");
    }
    // A layer announced by config.json but missing: refused before any copy.
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture("models/tiny-gpt2")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["n_layer"] = 3.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = weightsmith(&["load", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("tensor \"transformer.h.2.")
            && err.contains("is missing (config.json announces layer 2)"),
        "{err}"
    );
}

/// A copy of tiny-llama without one tensor, written with our writer.
fn llama_without(dir: &std::path::Path, dropped: &str) {
    let src = st_io::Checkpoint::open(fixture("models/tiny-llama")).unwrap();
    let keep: Vec<&st_io::TensorInfo> =
        src.tensors().iter().filter(|t| t.name != dropped).collect();
    let specs = keep
        .iter()
        .map(|t| st_io::TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let out = dir.join("m");
    let mut w = st_io::ShardWriter::create(&out, specs, st_io::WriterOptions::default()).unwrap();
    for t in keep {
        w.write_tensor(&t.name, src.tensor_bytes(t)).unwrap();
    }
    w.add_file(
        "config.json",
        &std::fs::read(fixture("models/tiny-llama/config.json")).unwrap(),
    )
    .unwrap();
    w.finish().unwrap();
}

#[test]
fn refuses_a_layer_missing_a_tensor_and_shapes_config_json_contradicts() {
    let tmp = tempfile::tempdir().unwrap();
    llama_without(tmp.path(), "model.layers.1.mlp.up_proj.weight");
    let out = weightsmith(&["load", tmp.path().join("m").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(
            "tensor \"model.layers.1.mlp.up_proj.weight\" is missing (a LlamaForCausalLM layer has it); it belongs in model.safetensors"
        ),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture("models/tiny-llama")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_key_value_heads"] = 4.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = weightsmith(&["load", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(
            "tensor \"model.layers.0.self_attn.k_proj.weight\" has shape [32, 64] but config.json"
        ),
        "{err}"
    );
}

#[test]
fn progress_names_the_file_units_and_devices() {
    let mut seen = Vec::new();
    let loaded = load(
        fixture("models/tiny-llama"),
        &LoadOptions::default(),
        &mut |p| {
            seen.push((
                p.file.to_string(),
                p.units.to_string(),
                p.bytes_done,
                p.bytes_total,
            ))
        },
    )
    .unwrap();
    assert_eq!(
        seen.len(),
        5,
        "one call before allocating, one per file and a final one: {seen:?}"
    );
    let device = loaded.tensors[0].device.to_string();
    // Before allocating: the whole plan, every unit with its device.
    assert_eq!(seen[0].0, "");
    assert!(
        seen[0].1.starts_with("embedding")
            && seen[0].1.ends_with(&format!(
                "head → {}",
                loaded.tensor("lm_head.weight").unwrap().device
            )),
        "{seen:?}"
    );
    assert_eq!(seen[1].0, "model-00001-of-00003.safetensors");
    assert!(
        seen[1].1.starts_with("embedding") && seen[1].1.ends_with(&format!("→ {device}")),
        "{seen:?}"
    );
    assert_eq!(
        seen[4].2, seen[4].3,
        "the last call reports every byte done"
    );
    assert!(seen.windows(2).all(|w| w[0].2 <= w[1].2));
}

#[test]
fn a_file_cut_short_during_the_load_fails_naming_the_tensor_unit_and_device() {
    // The second shard is truncated after the checkpoint was opened and checked, just before
    // its copies (a file changed under the loader, a network file system failing): the load
    // must stop with an error that names the file, the tensor, its unit and device, not
    // panic and not return a model with holes.
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("models/tiny-llama", dir.path());
    let victim = model.join("model-00002-of-00003.safetensors");
    let header_end = {
        let bytes = std::fs::read(&victim).unwrap();
        8 + u64::from_le_bytes(bytes[..8].try_into().unwrap())
    };
    let result = load(&model, &LoadOptions::default(), &mut |p| {
        if p.file == "model-00002-of-00003.safetensors" {
            // Keep the header and a few bytes of the first tensor.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&victim)
                .unwrap();
            f.set_len(header_end + 10).unwrap();
        }
    });
    let e = match result {
        Ok(_) => panic!("a truncated shard was loaded"),
        Err(e) => e,
    };
    let weightsmith::Error::Load {
        unit,
        device,
        message,
    } = &e
    else {
        panic!("not a load error: {e}");
    };
    assert!(unit.starts_with("layers."), "{e}");
    assert!(device == "host" || device.starts_with("cuda:"), "{e}");
    assert!(
        message.starts_with("model-00002-of-00003.safetensors: tensor \"model.layers."),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with(&format!("loading {unit} onto {device}: ")),
        "{e}"
    );
    assert!(
        message.ends_with("was it truncated or replaced during the load?"),
        "{e}"
    );
}
