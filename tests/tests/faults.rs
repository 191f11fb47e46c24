//! Faults a long job meets on a shared machine (issue #23): a merge killed with SIGKILL at
//! evenly spread moments of its run. Afterwards the output is absent or complete and
//! byte-identical to an uninterrupted run, the inputs are unchanged, and the next run succeeds
//! and leaves no temporary folder behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use weightsmith_tests::{
    bf16_header, entries, llama_shaped_files, sha256_hex, weightsmith_bin, LlamaShape,
};

const SHAPE: LlamaShape = LlamaShape {
    layers: 2,
    hidden: 512,
    intermediate: 1408,
    vocab: 16000,
    heads: 8,
    kv_heads: 2,
};

/// A Llama-shaped base (sparse zeros, 40 MB in 2 shards) and an r=8 LoRA on q_proj and v_proj.
fn make_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    let (files, _) = llama_shaped_files(&SHAPE, 2);
    for (name, stored) in files {
        let path = base.join(&name);
        std::fs::write(&path, &stored.content).unwrap();
        if let Some(len) = stored.sparse_len {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len)
                .unwrap();
        }
    }
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let (h, kv, r) = (
        SHAPE.hidden,
        SHAPE.kv_heads * (SHAPE.hidden / SHAPE.heads),
        8u64,
    );
    let mut tensors = Vec::new();
    for i in 0..SHAPE.layers {
        for (m, out) in [("q_proj", h), ("v_proj", kv)] {
            let p = format!("base_model.model.model.layers.{i}.self_attn.{m}");
            tensors.push((format!("{p}.lora_A.weight"), vec![r, h]));
            tensors.push((format!("{p}.lora_B.weight"), vec![out, r]));
        }
    }
    let (mut bytes, len) = bf16_header(&tensors);
    // Values 2^-7 and -2^-6 alternating (BF16 0x3C00, 0xBC80): a non-zero delta everywhere.
    while (bytes.len() as u64) < len {
        bytes.extend_from_slice(if bytes.len() % 4 == 0 {
            &[0x00, 0x3C]
        } else {
            &[0x80, 0xBC]
        });
    }
    std::fs::write(adapter.join("adapter_model.safetensors"), bytes).unwrap();
    let config = serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": false,
        "use_rslora": false, "use_dora": false, "task_type": "CAUSAL_LM"});
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    (base, adapter)
}

/// Every file below `dir` (relative name → SHA-256).
fn digest(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            for (k, v) in digest(&p) {
                out.insert(
                    format!("{}/{k}", p.file_name().unwrap().to_string_lossy()),
                    v,
                );
            }
        } else {
            out.insert(
                p.file_name().unwrap().to_string_lossy().into_owned(),
                sha256_hex(&std::fs::read(&p).unwrap()),
            );
        }
    }
    out
}

fn merge_command(base: &Path, adapter: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(weightsmith_bin());
    cmd.args([
        "merge",
        "--device",
        "cpu",
        "--force",
        "--max-shard-size",
        "15MB",
        "--base",
    ])
    .arg(base)
    .arg("--adapter")
    .arg(adapter)
    .arg("--out")
    .arg(out)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

#[test]
fn a_merge_killed_at_any_of_20_moments_leaves_nothing_wrong() {
    let work = tempfile::tempdir().unwrap();
    let (base, adapter) = make_inputs(work.path());
    let inputs = (digest(&base), digest(&adapter));
    // The uninterrupted run: the reference bytes and the run's length.
    let reference_dir = work.path().join("reference");
    std::fs::create_dir(&reference_dir).unwrap();
    let started = Instant::now();
    let status = merge_command(&base, &adapter, &reference_dir.join("out"))
        .status()
        .unwrap();
    assert!(status.success());
    let run = started.elapsed();
    let reference = digest(&reference_dir.join("out"));
    assert!(reference.len() >= 4, "{reference:?}");

    let points = 20;
    let (mut absent, mut complete) = (0, 0);
    for k in 1..=points {
        let parent = work.path().join(format!("round{k}"));
        std::fs::create_dir(&parent).unwrap();
        let out = parent.join("out");
        let mut child = merge_command(&base, &adapter, &out).spawn().unwrap();
        std::thread::sleep(run.mul_f64(k as f64 / (points + 1) as f64));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // The output is absent, or complete and the uninterrupted run's bytes.
        if out.exists() {
            assert_eq!(
                digest(&out),
                reference,
                "moment {k}: a present output differs"
            );
            complete += 1;
        } else {
            absent += 1;
        }
        assert_eq!(
            (digest(&base), digest(&adapter)),
            inputs,
            "moment {k}: an input changed"
        );
        // The next run succeeds, gives the same bytes, and leaves only the output.
        let status = merge_command(&base, &adapter, &out).status().unwrap();
        assert!(
            status.success(),
            "moment {k}: the run after the kill failed"
        );
        assert_eq!(digest(&out), reference, "moment {k}");
        assert_eq!(entries(&parent), ["out"], "moment {k}: left behind");
        std::fs::remove_dir_all(&parent).unwrap();
    }
    eprintln!("killed at {points} moments of a {run:?} merge: {absent} left no output, {complete} a complete one; none left a temporary folder after the next run");
    assert!(absent > 0, "no kill landed before the output was in place");
}

/// A write that the system refuses part-way (a full disk, or here the file-size limit of
/// `ulimit -f`, which fails writes past 5 MB with EFBIG as a full disk fails them with ENOSPC):
/// exit 1, an error naming the file being written, nothing left behind, inputs unchanged.
#[test]
fn a_write_refused_part_way_is_an_error_naming_the_file_and_leaves_nothing() {
    use std::os::unix::process::CommandExt;
    let work = tempfile::tempdir().unwrap();
    let (base, adapter) = make_inputs(work.path());
    let inputs = (digest(&base), digest(&adapter));
    let parent = work.path().join("outs");
    std::fs::create_dir(&parent).unwrap();
    let mut cmd = merge_command(&base, &adapter, &parent.join("out"));
    cmd.stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (setrlimit, signal) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 5 << 20,
                rlim_max: 5 << 20,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            // Without this, the kernel ends the process with SIGXFSZ instead of failing the write.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let shard = parent.join("out/model-00001-of-00003.safetensors");
    assert!(
        err.contains(&format!("{}: writing ", shard.display())),
        "the error names the file: {err}"
    );
    assert!(err.contains("the shard needs"), "and the bytes: {err}");
    assert!(
        entries(&parent).is_empty(),
        "left behind: {:?}",
        entries(&parent)
    );
    assert_eq!((digest(&base), digest(&adapter)), inputs);
}
