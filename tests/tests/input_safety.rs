//! An input is never harmed: for every verb that writes (merge) and every placement of its
//! output relative to an input — the input itself, inside it, a parent of it, a symbolic link
//! to it, a `..` spelling of it — with and without `--force`, the verb fails before writing and every input's files and
//! bytes are as they were. Plus the CLI rows of issue #25 and a named pipe in a model folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weightsmith::{merge, MergeOptions};
use weightsmith_tests::{copy_fixture, sha256_hex, weightsmith};

/// Every file under `dir` (following no links) with the SHA-256 of its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = p.symlink_metadata().unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_symlink() {
                out.insert(
                    p.clone(),
                    format!("link to {}", std::fs::read_link(&p).unwrap().display()),
                );
            } else {
                out.insert(p.clone(), sha256_hex(&std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

struct World {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    adapter: PathBuf,
}

/// root/models/tiny-llama, root/adapters/adapter, and symbolic links to both.
fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let models = root.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let base = copy_fixture("models/tiny-llama", &models);
    let adapters = root.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    let adapter = copy_fixture("adapters/llama-lora/adapter", &adapters);
    std::os::unix::fs::symlink(&base, root.join("base-link")).unwrap();
    std::os::unix::fs::symlink(&adapter, root.join("adapter-link")).unwrap();
    World {
        _tmp: tmp,
        root,
        base,
        adapter,
    }
}

/// Output placements relative to the inputs, each named.
fn placements(w: &World) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("the base", w.base.clone()),
        (
            "the base, trailing slash",
            PathBuf::from(format!("{}/", w.base.display())),
        ),
        (
            "the base, spelt with ..",
            w.root.join("adapters/../models/tiny-llama"),
        ),
        ("a link to the base", w.root.join("base-link")),
        ("inside the base", w.base.join("merged")),
        ("inside a link to the base", w.root.join("base-link/merged")),
        ("the folder holding the base", w.root.join("models")),
        ("the root holding everything", w.root.clone()),
        ("the adapter", w.adapter.clone()),
        ("a link to the adapter", w.root.join("adapter-link")),
        ("inside the adapter", w.adapter.join("out")),
        ("the folder holding the adapter", w.root.join("adapters")),
    ]
}

#[test]
fn no_output_placement_harms_an_input() {
    let w = world();
    let before = snapshot(&w.root);
    for (what, out) in placements(&w) {
        for force in [false, true] {
            let options = MergeOptions {
                force,
                device: weightsmith::MergeDevice::Cpu,
                ..MergeOptions::new(vec![(w.adapter.clone(), 1.0)], &out)
            };
            let r = merge(&w.base, &options, &mut |_| {});
            let e = match r {
                Ok(_) => panic!("output at {what} (force {force}) was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains("the output")
                    || e.contains("--force replaces only")
                    || e.contains("already exists"),
                "{what} (force {force}): {e}"
            );
            assert_eq!(
                snapshot(&w.root),
                before,
                "{what} (force {force}) changed an input"
            );
        }
    }
}

#[test]
fn outputs_beside_the_inputs_are_written() {
    let w = world();
    let before = snapshot(&w.root);
    let out = w._tmp.path().join("elsewhere/merged");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let options = MergeOptions {
        device: weightsmith::MergeDevice::Cpu,
        ..MergeOptions::new(vec![(w.adapter.clone(), 1.0)], &out)
    };
    merge(&w.base, &options, &mut |_| {}).unwrap();
    // Run again with --force: the earlier output is replaced, the inputs untouched.
    let options = MergeOptions {
        force: true,
        ..options
    };
    merge(&w.base, &options, &mut |_| {}).unwrap();
    let after: BTreeMap<PathBuf, String> = snapshot(&w.root)
        .into_iter()
        .filter(|(p, _)| !p.starts_with(&out) && !p.starts_with(out.parent().unwrap()))
        .collect();
    assert_eq!(after, before);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The rows of issue #25 with the CLI: --out = the base, the adapter, the folder holding the
/// base, each with --force: exit 1, both paths named, every input intact.
#[test]
fn the_cli_refuses_every_reported_overlap() {
    let w = world();
    let before = snapshot(&w.root);
    for out in [w.base.clone(), w.adapter.clone(), w.root.join("models")] {
        let o = weightsmith(&[
            "merge",
            "--base",
            s(&w.base),
            "--adapter",
            s(&w.adapter),
            "--out",
            s(&out),
            "--force",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(s(&out)), "{err}");
        assert!(err.contains("input"), "{err}");
        assert_eq!(snapshot(&w.root), before);
    }
}

#[test]
fn a_named_pipe_in_a_model_folder_is_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_fixture("models/tiny-mistral", tmp.path());
    let shard = m.join("model.safetensors");
    std::fs::remove_file(&shard).unwrap();
    let c = std::ffi::CString::new(s(&shard)).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc_mkfifo(c.as_ptr(), 0o600) }, 0);
    // The binary is built (when missing) outside the timed calls.
    let _ = weightsmith(&["--version"]);
    for verb in [
        vec!["inspect", s(&m)],
        vec!["plan", s(&m), "--devices", "1GiB"],
        vec!["load", s(&m)],
    ] {
        let started = Instant::now();
        let o = weightsmith(&verb);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{verb:?}: {err}");
        assert!(
            err.contains("named pipe") && err.contains("model.safetensors"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{verb:?} took {:?}",
            started.elapsed()
        );
    }
    // A pipe in place of a file that merge copies (the tokenizer) is refused too.
    let m2 = copy_fixture("models/tiny-llama", tmp.path());
    let tok = m2.join("tokenizer.json");
    std::fs::remove_file(&tok).unwrap();
    let c = std::ffi::CString::new(s(&tok)).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc_mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = tmp.path().join("merged");
    let o = weightsmith(&[
        "merge",
        "--base",
        s(&m2),
        "--adapter",
        s(&weightsmith_tests::fixture("adapters/llama-lora/adapter")),
        "--out",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("named pipe") && err.contains("tokenizer.json"),
        "{err}"
    );
    assert!(!out.exists());
}

extern "C" {
    #[link_name = "mkfifo"]
    fn libc_mkfifo(path: *const std::os::raw::c_char, mode: u32) -> i32;
}
