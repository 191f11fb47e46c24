//! `weightsmith merge` as a user runs it: the README's main command, a complete output
//! folder, the report, and clear errors for bad adapters and options.

use std::path::Path;

use serde_json::Value;
use weightsmith_tests::{copy_fixture, fixture, sha256_hex, weightsmith};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = weightsmith(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn the_readme_merge_makes_a_complete_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let base = fixture("models/tiny-llama");
    let adapter = fixture("adapters/llama-lora/adapter");
    let (code, stdout, err) = run(&[
        "merge",
        "--base",
        &s(&base),
        "--adapter",
        &s(&adapter),
        "--out",
        &s(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("merged 1 adapter(s)"), "{stdout}");
    assert!(
        stdout.contains("model.layers.2.mlp.down_proj.weight"),
        "the report lists changed tensors: {stdout}"
    );
    // Every non-weight file of the base, unchanged (config.json aside).
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        let a = std::fs::read(base.join(f)).unwrap();
        let b = std::fs::read(out.join(f)).unwrap_or_else(|_| panic!("{f} not copied"));
        assert_eq!(sha256_hex(&a), sha256_hex(&b), "{f} changed");
    }
    // No adapter files: transformers would attach the adapter instead (peft #1381).
    for e in std::fs::read_dir(&out).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with("adapter_"), "{name} in the output");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    assert!(config.get("quantization_config").is_none());
    assert_eq!(config["tie_word_embeddings"], false);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    // The adapter names a local path as its base: not valid Hub metadata, so left out.
    assert!(card.starts_with("---\n"), "{card}");
    assert!(!card.contains("base_model:"), "{card}");
    assert!(
        card.contains("- \"weightsmith\"")
            && card.contains("library_name: transformers")
            && card.contains("pipeline_tag: text-generation"),
        "{card}"
    );
    // It is a valid checkpoint that inspects cleanly.
    let (code, text, err) = run(&["inspect", &s(&out)]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("problems: none"), "{text}");
    // Nothing left beside the output.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn reports_json_and_shards_as_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let (code, stdout, err) = run(&[
        "merge",
        "--base",
        &s(&fixture("models/tiny-llama")),
        "--adapter",
        &s(&fixture("adapters/llama-two-weighted/adapter")),
        "--adapter",
        &format!(
            "{}:0.5",
            s(&fixture("adapters/llama-two-weighted/adapter2"))
        ),
        "--out",
        &s(&out),
        "--dtype",
        "f16",
        "--max-shard-size",
        "100KB",
        "--verify",
        "--json",
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["schema_version"], 1);
    assert_eq!(r["dtype"], "F16");
    assert_eq!(r["adapters"][1]["weight"], 0.5);
    assert!(r["verify"]["max_ulps"].as_u64().unwrap() <= 1);
    assert!(r["modules"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["relative_delta"].as_f64().unwrap() > 0.0));
    assert!(out.join("model.safetensors.index.json").exists());
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "float16");
}

#[test]
fn refuses_an_existing_output_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "keep").unwrap();
    let args = [
        "merge",
        "--base",
        &s(&fixture("models/tiny-qwen2")),
        "--adapter",
        &s(&fixture("adapters/qwen2-tied-bias/adapter")),
        "--out",
        &s(&out),
    ];
    let (code, _, err) = run(&args);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    assert!(out.join("mine.txt").exists());
    let mut forced = args.to_vec();
    forced.push("--force");
    // --force replaces only what looks like a checkpoint folder: not this one.
    let (code, _, err) = run(&forced);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--force replaces only") && err.contains("mine.txt"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("mine.txt")).unwrap(),
        "keep"
    );
    // An earlier output is replaced.
    std::fs::remove_file(out.join("mine.txt")).unwrap();
    std::fs::write(out.join("config.json"), "{}").unwrap();
    std::fs::write(out.join("model.safetensors"), "old").unwrap();
    let (code, _, err) = run(&forced);
    assert_eq!(code, 0, "{err}");
    assert!(st_io::Checkpoint::open(&out).is_ok());
}

#[test]
fn rejects_bad_adapters_and_options_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = s(&fixture("models/tiny-llama"));
    let qwen = s(&fixture("models/tiny-qwen2"));
    let lora = s(&fixture("adapters/llama-lora/adapter"));
    let out = s(&tmp.path().join("o"));
    // An adapter made for another model.
    let (code, _, err) = run(&["merge", "--base", &qwen, "--adapter", &lora, "--out", &out]);
    assert_eq!(code, 1);
    assert!(
        err.contains("module \"model.layers.0.mlp.down_proj\"")
            || err.contains("module \"model.layers.0."),
        "{err}"
    );
    assert!(!tmp.path().join("o").exists());
    // A pickle adapter, a non-LoRA adapter, a broken config.
    let bin = tmp.path().join("bin-adapter");
    std::fs::create_dir(&bin).unwrap();
    std::fs::copy(
        fixture("adapters/llama-lora/adapter/adapter_config.json"),
        bin.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(bin.join("adapter_model.bin"), b"pickle").unwrap();
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &llama,
        "--adapter",
        &s(&bin),
        "--out",
        &out,
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("adapter_model.bin")
            && err.contains("save_pretrained(out, safe_serialization=True)"),
        "{err}"
    );
    let ia3 = tmp.path().join("ia3");
    std::fs::create_dir(&ia3).unwrap();
    std::fs::write(ia3.join("adapter_config.json"), r#"{"peft_type":"IA3"}"#).unwrap();
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &llama,
        "--adapter",
        &s(&ia3),
        "--out",
        &out,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("IA3 adapters are not supported"), "{err}");
    // A rank that disagrees with the config.
    let bad_rank = tmp.path().join("bad-rank");
    std::fs::create_dir(&bad_rank).unwrap();
    std::fs::copy(
        fixture("adapters/llama-lora/adapter/adapter_model.safetensors"),
        bad_rank.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("adapters/llama-lora/adapter/adapter_config.json"))
            .unwrap(),
    )
    .unwrap();
    cfg["r"] = 4.into();
    std::fs::write(bad_rank.join("adapter_config.json"), cfg.to_string()).unwrap();
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &llama,
        "--adapter",
        &s(&bad_rank),
        "--out",
        &out,
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("but the config gives this module rank 4"),
        "{err}"
    );
    // Options.
    for (extra, needle) in [
        (vec!["--dtype", "f32"], "--dtype must be bf16 or f16"),
        (
            vec!["--device", "tpu"],
            "--device must be auto, cpu or cuda:N",
        ),
        (
            // No driver here, no 8th GPU on the device machine: a clear error either way.
            vec!["--device", "cuda:7"],
            "GPU merge: ",
        ),
        (vec!["--max-shard-size", "big"], "invalid size \"big\""),
    ] {
        let mut args = vec![
            "merge",
            "--base",
            llama.as_str(),
            "--adapter",
            lora.as_str(),
            "--out",
            out.as_str(),
        ];
        args.extend(extra);
        let (code, _, err) = run(&args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(needle), "{needle:?} not in {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert!(
        !tmp.path().join("o").exists(),
        "no output after any failure"
    );
}

#[test]
fn a_trained_head_of_a_tied_model_is_written_and_untied() {
    // Qwen2 ties its head to the embedding; an adapter that saved lm_head (modules_to_save)
    // must give a model whose head is that tensor, not the embedding (transformers #45127).
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::write(adapter.join("adapter_config.json"), r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj"],"modules_to_save":["lm_head"]}"#).unwrap();
    let head: Vec<u8> = (0..128 * 32)
        .flat_map(|i: u32| {
            weightsmith::st_io::convert::f32_to_bf16_bits((i % 97) as f32 / 97.0 - 0.5)
                .to_le_bytes()
        })
        .collect();
    let spec = vec![st_io::TensorSpec::new(
        "base_model.model.lm_head.weight",
        st_io::Dtype::BF16,
        vec![128, 32],
    )];
    let mut w = st_io::ShardWriter::create(
        tmp.path().join("weights"),
        spec,
        st_io::WriterOptions::default(),
    )
    .unwrap();
    w.write_tensor("base_model.model.lm_head.weight", &head)
        .unwrap();
    w.finish().unwrap();
    std::fs::rename(
        tmp.path().join("weights/model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    let out = tmp.path().join("merged");
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &s(&fixture("models/tiny-qwen2")),
        "--adapter",
        &s(&adapter),
        "--out",
        &s(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    let merged = st_io::Checkpoint::open(&out).unwrap();
    let base = st_io::Checkpoint::open(fixture("models/tiny-qwen2")).unwrap();
    assert!(
        base.tensor("lm_head.weight").is_none(),
        "the fixture is tied"
    );
    assert_eq!(
        merged.tensor_bytes(merged.tensor("lm_head.weight").unwrap()),
        head.as_slice()
    );
    let emb = "model.embed_tokens.weight";
    assert_eq!(
        merged.tensor_bytes(merged.tensor(emb).unwrap()),
        base.tensor_bytes(base.tensor(emb).unwrap())
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], false);
}

#[test]
fn ctrl_c_stops_the_merge_and_leaves_nothing_behind() {
    // The tiny Llama with one more shard holding a 1 GiB tensor (a sparse file), so the merge
    // is still writing when the signal comes.
    let tmp = tempfile::tempdir().unwrap();
    let base = copy_fixture("models/tiny-llama", tmp.path());
    let (rows, cols) = (16384u64, 32768u64);
    let bytes = rows * cols * 2;
    let mut header = format!(
        "{{\"extra.weight\":{{\"dtype\":\"BF16\",\"shape\":[{rows},{cols}],\"data_offsets\":[0,{bytes}]}}}}"
    );
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let shard = base.join("model-extra.safetensors");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&shard).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.set_len(8 + header.len() as u64 + bytes).unwrap();
    }
    let index_path = base.join("model.safetensors.index.json");
    let mut index: Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]["extra.weight"] = Value::from("model-extra.safetensors");
    let total = index["metadata"]["total_size"].as_u64().unwrap() + bytes;
    index["metadata"]["total_size"] = Value::from(total);
    std::fs::write(&index_path, index.to_string()).unwrap();

    let out = tmp.path().join("merged");
    let mut child = std::process::Command::new(weightsmith_tests::weightsmith_bin())
        .args(["merge", "--device", "cpu", "--base"])
        .arg(&base)
        .args([
            "--adapter",
            &s(&fixture("adapters/llama-lora/adapter")),
            "--out",
        ])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the hidden work folder exists the merge is writing: interrupt it.
    let started = std::time::Instant::now();
    let writing = || {
        std::fs::read_dir(tmp.path()).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".merged.")
        })
    };
    while !writing() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the merge ended before it started writing"
        );
        assert!(
            started.elapsed().as_secs() < 120,
            "the merge never started writing"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("error: interrupted:"), "{stderr}");
    assert!(!out.exists(), "an output folder was left: {stderr}");
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "tiny-llama")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn an_adapter_that_overflows_fails_naming_the_tensor_and_leaves_nothing() {
    // The tiny Llama's adapter with one module of the second layer broken: its B all 3e38, so
    // W + B·A overflows f32. The merge has written the first layer when it finds out.
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("adapters/llama-lora/adapter", tmp.path());
    let file = adapter.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let broken = &header["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"];
    assert_eq!(broken["dtype"], "F32");
    let (start, end) = (
        broken["data_offsets"][0].as_u64().unwrap() as usize + 8 + header_len,
        broken["data_offsets"][1].as_u64().unwrap() as usize + 8 + header_len,
    );
    for v in bytes[start..end].chunks_exact_mut(4) {
        v.copy_from_slice(&3e38f32.to_le_bytes());
    }
    std::fs::write(&file, &bytes).unwrap();
    let out = tmp.path().join("merged");
    for device in ["cpu", "auto"] {
        let (code, _, err) = run(&[
            "merge",
            "--device",
            device,
            "--base",
            &s(&fixture("models/tiny-llama")),
            "--adapter",
            &s(&adapter),
            "--out",
            &s(&out),
        ]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("merging \"model.layers.1.mlp.up_proj.weight\": ")
                && err.contains("non-finite value"),
            "{err}"
        );
        assert!(!out.exists(), "an output folder was left: {err}");
        let left: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "adapter")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

/// The libraries log through `tracing`; the CLI shows their debug events on stderr when
/// `WEIGHTSMITH_TRACE` is set, and nothing of them otherwise.
#[test]
fn weightsmith_trace_shows_the_libraries_events_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let run = |trace: bool| {
        let mut cmd = std::process::Command::new(weightsmith_tests::weightsmith_bin());
        cmd.args(["merge", "--base"])
            .arg(weightsmith_tests::fixture("models/tiny-llama"))
            .arg("--adapter")
            .arg(weightsmith_tests::fixture("adapters/llama-lora/adapter"))
            .arg("--out")
            .arg(dir.path().join("m"))
            .arg("--force")
            .env_remove("WEIGHTSMITH_TRACE");
        if trace {
            cmd.env("WEIGHTSMITH_TRACE", "1");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    assert!(run(true).contains("DEBUG merge trace:"));
    assert!(!run(false).contains("merge trace"));
}

/// `DIR:W` weights an adapter only when `DIR:W` is not itself a path: an adapter folder named
/// `run:2` merges with weight 1, and `run:2` beside a folder `run` means `run` weighted 2.
#[test]
fn an_adapter_folder_whose_name_ends_in_a_number_is_a_folder_not_a_weight() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = weightsmith_tests::fixture("adapters/llama-lora/adapter");
    for name in ["run:2", "run"] {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for f in std::fs::read_dir(&adapter).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
    }
    let merge = |adapter_arg: &str, out: &str| {
        let out = dir.path().join(out);
        let o = weightsmith_tests::weightsmith(&[
            "merge",
            "--base",
            weightsmith_tests::fixture("models/tiny-llama")
                .to_str()
                .unwrap(),
            "--adapter",
            adapter_arg,
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (
            report["adapters"][0]["weight"].as_f64().unwrap(),
            report["adapters"][0]["path"].as_str().unwrap().to_string(),
        )
    };
    let (w, path) = merge(dir.path().join("run:2").to_str().unwrap(), "a");
    assert_eq!(w, 1.0);
    assert!(path.ends_with("run:2"), "{path}");
    std::fs::remove_dir_all(dir.path().join("run:2")).unwrap();
    let (w, path) = merge(dir.path().join("run:2").to_str().unwrap(), "b");
    assert_eq!(w, 2.0);
    assert!(path.ends_with("run"), "{path}");
}
