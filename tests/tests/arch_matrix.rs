//! The architecture matrix (scripts/fixtures/make_arch_matrix.py: tiny models transformers builds for
//! every family, an all-linear LoRA made by PEFT, PEFT's merge_and_unload output): for every
//! case, our merge writes what PEFT wrote — the same files (plus our model card), config.json
//! equal but for the dtype keys, generation config and tokenizer files copied byte for byte,
//! every tensor within 1 ulp — and st-io's completeness check finds every tensor removed from
//! the base, in a 1-layer and a 2-layer model.
//!
//! transformers loading our output with PEFT's logits, and the GPU merge equal to the CPU's,
//! are checked on the device by scripts/device/arch-matrix.sh (scripts/device/check_arch_matrix.py).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use st_io::{Checkpoint, Dtype};
use weightsmith::{merge, MergeOptions};
use weightsmith_tests::{compare_with_reference, fixture};

/// Every case folder of the matrix, by model_type.
fn cases() -> Vec<(String, PathBuf)> {
    cases_in("matrix")
}

/// Every case folder (one with a case.json) of a fixture folder, by model_type.
fn cases_in(folder: &str) -> Vec<(String, PathBuf)> {
    let root = fixture(folder);
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("case.json").is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    out.sort();
    out
}

fn files_of(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn without_dtype(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("dtype");
        o.remove("torch_dtype");
    }
    v
}

#[test]
fn the_matrix_covers_at_least_25_architectures() {
    let cases = cases();
    assert!(cases.len() >= 25, "{} cases", cases.len());
    let families = st_io::arch::families();
    for (name, _) in &cases {
        assert!(
            families.contains_key(name),
            "{name} is in the matrix but not in architectures.json"
        );
    }
}

#[test]
fn every_architecture_merges_to_peft_s_output() {
    merges_to_peft_s_output(cases(), 25);
}

/// Multimodal models (scripts/fixtures/make_multimodal_fixtures.py): checkpoints keep the
/// on-disk names of the classes that wrote them (`language_model.model.layers…`, Qwen2-VL's
/// `model.layers…`), transformers renames them on loading and PEFT names the in-memory
/// modules; the LoRA covers the vision tower and projector too. transformers loading our
/// output is checked by tests/python/test_multimodal.py.
#[test]
fn every_multimodal_model_merges_to_peft_s_output() {
    merges_to_peft_s_output(cases_in("multimodal"), 4);
}

/// Every multimodal base loads, the decoder's shape checks applied to the text model alone
/// (the vision tower's attention has shapes of its own), and reads back equal to its file.
#[test]
fn every_multimodal_model_loads() {
    for (name, dir) in cases_in("multimodal") {
        let options = weightsmith::LoadOptions {
            host_only: true,
            verify: true,
            ..weightsmith::LoadOptions::default()
        };
        let loaded = weightsmith::load(dir.join("base"), &options, &mut |_| {})
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            loaded.report.verified_tensors,
            Some(loaded.tensors.len()),
            "{name}"
        );
    }
}

/// Our merge of each case against PEFT's output: the same files (plus our model card),
/// config.json equal but for the dtype keys, generation config and tokenizer files as the
/// base's, every tensor within 1 ulp of PEFT's.
fn merges_to_peft_s_output(cases: Vec<(String, PathBuf)>, at_least: usize) {
    assert!(cases.len() >= at_least, "{} cases", cases.len());
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut table = Vec::new();
    for (name, dir) in cases {
        let out = tmp.path().join(&name);
        let options = MergeOptions {
            dtype: Some(Dtype::BF16),
            verify: true,
            device: weightsmith::MergeDevice::Cpu,
            ..MergeOptions::new(vec![(dir.join("adapter"), 1.0)], &out)
        };
        let report = match merge(dir.join("base"), &options, &mut |_| {}) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{name}: merge failed: {e}"));
                continue;
            }
        };
        let reference = dir.join("merged");
        // The same files, plus our model card.
        let mut expected = files_of(&reference);
        expected.insert("README.md".into());
        let ours = files_of(&out);
        if ours != expected {
            failures.push(format!("{name}: files {ours:?}, PEFT's {expected:?}"));
        }
        // config.json as PEFT's save_pretrained wrote it, but for the dtype keys.
        if without_dtype(json(&out.join("config.json")))
            != without_dtype(json(&reference.join("config.json")))
        {
            failures.push(format!(
                "{name}: config.json differs from PEFT's beyond the dtype"
            ));
        }
        // Copied files: byte for byte from the base.
        for f in files_of(&dir.join("base")) {
            let copied = f == "generation_config.json"
                || f.starts_with("tokenizer")
                || f.starts_with("special_tokens")
                || f.starts_with("chat_template");
            if copied
                && std::fs::read(out.join(&f)).ok() != std::fs::read(dir.join("base").join(&f)).ok()
            {
                failures.push(format!("{name}: {f} is not the base's, byte for byte"));
            }
        }
        if json(&out.join("generation_config.json"))
            != json(&reference.join("generation_config.json"))
        {
            failures.push(format!(
                "{name}: generation_config.json differs from PEFT's"
            ));
        }
        let ours = Checkpoint::open(&out).unwrap();
        let peft = Checkpoint::open(&reference).unwrap();
        let base = Checkpoint::open(dir.join("base")).unwrap();
        let outcome = std::panic::catch_unwind(|| compare_with_reference(&ours, &peft, &base));
        match outcome {
            Ok(o) if o.max_ulps <= 1 && o.changed > 0 => {
                table.push(format!(
                    "{name}: {} tensors, {} changed by PEFT, {} ulp max, verify {} ulp",
                    peft.tensors().len(),
                    o.changed,
                    o.max_ulps,
                    report.verify.as_ref().map_or(0, |v| v.max_ulps)
                ));
            }
            Ok(o) => failures.push(format!(
                "{name}: {} ulps from PEFT, {} tensors changed",
                o.max_ulps, o.changed
            )),
            Err(_) => failures.push(format!("{name}: tensors differ (see the panic above)")),
        }
        if let Some(v) = &report.verify {
            if v.max_ulps > 1 {
                failures.push(format!("{name}: verify {v:?}"));
            }
        }
    }
    eprintln!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A copy of a matrix base with `keep_layers` layers (config.json says so) and `remove`d tensors,
/// written with st-io's writer.
fn trimmed_base(dir: &Path, keep_layers: u64, remove: &[String], into: &Path) -> PathBuf {
    let base = Checkpoint::open(dir.join("base")).unwrap();
    let prefix = base.layout().layer_prefix.clone();
    let keep = |name: &str| -> bool {
        if remove.iter().any(|r| r == name) {
            return false;
        }
        match (&prefix, st_io::layout::classify(name)) {
            (Some(p), st_io::layout::TensorPlace::Layer { prefix, index }) if &prefix == p => {
                index < keep_layers
            }
            _ => true,
        }
    };
    let tensors: Vec<&st_io::TensorInfo> =
        base.tensors().iter().filter(|t| keep(&t.name)).collect();
    let specs = tensors
        .iter()
        .map(|t| st_io::TensorSpec::new(&t.name, t.dtype, t.shape.clone()))
        .collect();
    let out = into.join(format!(
        "{}-{keep_layers}",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&out);
    let mut w = st_io::ShardWriter::create(&out, specs, st_io::WriterOptions::default()).unwrap();
    for t in &tensors {
        w.write_tensor(&t.name, base.tensor_bytes(t)).unwrap();
    }
    let mut config = json(&dir.join("base/config.json"));
    for key in ["num_hidden_layers", "n_layer", "num_layers"] {
        if config.get(key).is_some() {
            config[key] = keep_layers.into();
        }
    }
    for key in ["layer_types", "mlp_only_layers"] {
        if let Some(Value::Array(a)) = config.get_mut(key) {
            a.truncate(keep_layers as usize);
        }
    }
    w.add_file(
        "config.json",
        serde_json::to_string(&config).unwrap().as_bytes(),
    )
    .unwrap();
    w.finish().unwrap();
    out
}

#[test]
fn every_family_refuses_a_checkpoint_with_a_tensor_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (name, dir) in cases() {
        for layers in [1u64, 2] {
            let whole = trimmed_base(&dir, layers, &[], tmp.path());
            let c = Checkpoint::open(&whole).unwrap();
            let names: Vec<&str> = c.tensors().iter().map(|t| t.name.as_str()).collect();
            let complete = st_io::arch::completeness(names.iter().copied(), c.config());
            if !complete.is_complete() || !complete.unexpected.is_empty() {
                failures.push(format!(
                    "{name} ({layers} layers): complete model reported {complete:?}"
                ));
                continue;
            }
            // Each layer tensor of the last layer, and each model tensor, removed in turn.
            let last = layers - 1;
            let candidates: Vec<String> = names
                .iter()
                .filter(|n| match st_io::layout::classify(n) {
                    st_io::layout::TensorPlace::Layer { index, .. } => index == last,
                    _ => true,
                })
                .map(|n| n.to_string())
                .collect();
            for gone in &candidates {
                let rest = names.iter().copied().filter(|n| n != gone);
                let r = st_io::arch::completeness(rest, c.config());
                if !r.missing.iter().any(|m| &m.tensor == gone) {
                    failures.push(format!(
                        "{name} ({layers} layers): removing {gone} is not found: {r:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn inspect_lists_and_the_verbs_refuse_a_missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("matrix/llama");
    let gone = "model.layers.1.mlp.up_proj.weight".to_string();
    let broken = trimmed_base(&dir, 2, std::slice::from_ref(&gone), tmp.path());
    let report = weightsmith::inspect(&broken, &weightsmith::InspectOptions::default()).unwrap();
    assert!(
        report.problems.iter().any(|p| p.message.contains(&gone)),
        "{:?}",
        report.problems
    );
    let plan = weightsmith::plan_checkpoint(&broken, &weightsmith::PlanOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        plan.contains(&gone) && plan.contains("model.safetensors"),
        "{plan}"
    );
    let out = tmp.path().join("merged");
    let options = MergeOptions::new(vec![(fixture("matrix/llama/adapter"), 1.0)], &out);
    // The adapter targets up_proj: a module whose tensor is missing. Also refused before
    // anything is written.
    let e = merge(&broken, &options, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains(&gone), "{e}");
    assert!(!out.exists());
}

const README_START: &str = "<!-- architectures: made from fixtures/matrix by tests/tests/arch_matrix.rs; `WEIGHTSMITH_BLESS=1 cargo test -p weightsmith-tests --test arch_matrix` rewrites it -->";
const README_END: &str = "<!-- end of architectures -->";

/// docs/architectures.md's table of architectures, made from the matrix.
fn readme_table() -> String {
    let mut s = String::from(
        "| model_type | transformers class | what the case covers | PEFT LoRA |\n|---|---|---|---|\n",
    );
    for (name, dir) in cases() {
        let case = json(&dir.join("case.json"));
        let names = |v: &Value| -> Option<String> {
            let a = v.as_array().filter(|a| !a.is_empty())?;
            Some(
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        };
        let request = &case["lora_request"]["target_modules"];
        let modules = match request.as_str() {
            Some(s) => s.to_string(),
            None => names(request).unwrap_or_default(),
        };
        let params = names(&case["target_parameters"])
            .map(|p| format!(" + `target_parameters` {p}"))
            .unwrap_or_default();
        s.push_str(&format!(
            "| `{name}` | {} | {} | {modules}{params} |\n",
            case["architecture"].as_str().unwrap_or("?"),
            case["covers"].as_str().unwrap_or(""),
        ));
    }
    s
}

#[test]
fn the_docs_list_the_matrix_as_it_is() {
    let path = weightsmith_tests::repo_root().join("docs/architectures.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let block = format!("{README_START}\n{}{README_END}", readme_table());
    if std::env::var_os("WEIGHTSMITH_BLESS").is_some() {
        let (Some(a), Some(b)) = (readme.find(README_START), readme.find(README_END)) else {
            panic!("docs/architectures.md has no architectures block to rewrite");
        };
        let updated = format!("{}{block}{}", &readme[..a], &readme[b + README_END.len()..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    assert!(
        readme.contains(&block),
        "docs/architectures.md's architectures table is not the matrix's: run WEIGHTSMITH_BLESS=1 cargo test -p weightsmith-tests --test arch_matrix"
    );
}

/// With a GPU (scripts/gpu-check.sh sets WEIGHTSMITH_REQUIRE_GPU=1, so a CUDA start-up failure
/// fails here), every case's CUDA merge is the CPU merge bit for bit, MoE experts included.
#[test]
fn the_gpu_merge_of_every_architecture_is_the_cpu_merge() {
    if !weightsmith_tests::gpu_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (name, dir) in cases() {
        let mut outputs = Vec::new();
        for device in [
            weightsmith::MergeDevice::Cpu,
            weightsmith::MergeDevice::Cuda(0),
        ] {
            let out = tmp.path().join(format!("{name}-{device:?}"));
            let options = MergeOptions {
                device,
                ..MergeOptions::new(vec![(dir.join("adapter"), 1.0)], &out)
            };
            merge(dir.join("base"), &options, &mut |_| {}).unwrap();
            outputs.push(Checkpoint::open(&out).unwrap());
        }
        for t in outputs[0].tensors() {
            let g = outputs[1].tensor(&t.name).unwrap();
            if outputs[0].tensor_bytes(t) != outputs[1].tensor_bytes(g) {
                failures.push(format!("{name}: {} differs between CPU and GPU", t.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A LoRA on fused experts whose factors do not fit the base is refused, naming the module and
/// why, never merged at the wrong places.
#[test]
fn lora_on_experts_that_does_not_fit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("matrix/mixtral");
    for (rank, expect) in [
        (4, "but the base stores 4 experts: check rank_pattern"),
        (3, "not a multiple of its rank 3"),
    ] {
        let adapter = tmp.path().join(format!("adapter-{rank}"));
        std::fs::create_dir(&adapter).unwrap();
        std::fs::copy(
            dir.join("adapter/adapter_model.safetensors"),
            adapter.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut config = json(&dir.join("adapter/adapter_config.json"));
        config["rank_pattern"] = serde_json::json!({ ".*\\.gate_up_proj": rank });
        std::fs::write(
            adapter.join("adapter_config.json"),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        let out = tmp.path().join(format!("out-{rank}"));
        let options = MergeOptions {
            device: weightsmith::MergeDevice::Cpu,
            ..MergeOptions::new(vec![(adapter, 1.0)], &out)
        };
        let e = merge(dir.join("base"), &options, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.layers.0.mlp.experts") && e.contains(expect),
            "{e}"
        );
        assert!(!out.exists());
    }
}
