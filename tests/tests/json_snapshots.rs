//! Golden snapshots of every `--json` document the CLI prints (inspect, inspect --tensors, plan,
//! merge, load, publish, merge --push-to), so that a renamed, dropped or retyped field fails a
//! test instead of a user's pipeline. Each document carries `schema_version`.
//!
//! What varies from run to run is normalised before the comparison, never dropped: a time or a
//! rate becomes `"<number>"` (a field that stops being a number still fails), the scratch
//! folder `<TMP>`, the test Hub's address `<ENDPOINT>`, the host's memory `"<host bytes>"`, and
//! every other float is rounded to 6 significant digits.
//!
//! After an intended change of a document: `WEIGHTSMITH_BLESS=1 cargo test -p weightsmith-tests
//! --test json_snapshots` rewrites `tests/snapshots/`, and the diff is reviewed like code.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use weightsmith_tests::hub_server::{HubServer, Transfer};
use weightsmith_tests::{repo_root, weightsmith_bin};

const TOKEN: &str = "hf_snapshotToken";

/// Keys whose values depend on the clock.
const TIMED: &[&str] = &["seconds", "gb_per_s"];

/// Runs the CLI in `cwd` (the repository, so paths given relative stay relative in the
/// documents) with no Hub environment and no GPU visible.
fn json_of(args: &[&str], home: &Path) -> Value {
    let out = Command::new(weightsmith_bin())
        .args(args)
        .current_dir(repo_root())
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_HOME")
        .env_remove("HF_TOKEN_PATH")
        .env("HOME", home)
        // The load document of a GPU machine is another document (its devices, its paths):
        // the snapshot is the host's, on every machine.
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .expect("run weightsmith");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?} printed no JSON document ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

struct Normalise<'a> {
    replacements: Vec<(String, &'a str)>,
    /// Keys that hold the host's memory sizes (the load document's plan on `--devices auto`).
    host_bytes: &'a [&'a str],
}

impl Normalise<'_> {
    fn value(&self, key: Option<&str>, v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    if k == "phases" {
                        // Each phase is a time; the set of phases is part of the schema.
                        if let Value::Object(phases) = child {
                            for p in phases.values_mut() {
                                assert!(p.is_number(), "phase {p} is not a number");
                                *p = Value::String("<number>".into());
                            }
                            continue;
                        }
                    }
                    self.value(Some(k), child);
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.value(key, item);
                }
            }
            Value::Number(n) => {
                if key.is_some_and(|k| TIMED.contains(&k)) {
                    *v = Value::String("<number>".into());
                } else if key.is_some_and(|k| self.host_bytes.contains(&k)) {
                    *v = Value::String("<host bytes>".into());
                } else if n.is_f64() {
                    let x = n.as_f64().unwrap();
                    let rounded: f64 = format!("{x:.6e}").parse().unwrap();
                    *v = serde_json::json!(rounded);
                }
            }
            Value::String(s) => {
                for (from, to) in &self.replacements {
                    if s.contains(from.as_str()) {
                        *s = s.replace(from.as_str(), to);
                    }
                }
            }
            _ => {}
        }
    }
}

fn snapshot_path(name: &str) -> PathBuf {
    repo_root()
        .join("tests/snapshots")
        .join(format!("{name}.json"))
}

/// The first place where two documents differ, as a JSON pointer with both values.
fn first_difference(path: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => {
                        if let Some(d) = first_difference(&format!("{path}/{k}"), p, q) {
                            return Some(d);
                        }
                    }
                    (p, q) => return Some(format!("{path}/{k}: expected {p:?}, got {q:?}")),
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(&format!("{path}/{i}"), p, q)),
        _ if a == b => None,
        _ => Some(format!("{path}: expected {a}, got {b}")),
    }
}

/// Compares `doc` (normalised) with its committed snapshot, or writes it under
/// WEIGHTSMITH_BLESS=1.
fn check(name: &str, mut doc: Value, norm: &Normalise) {
    assert!(
        doc.get("schema_version").is_some_and(Value::is_u64),
        "{name}: no schema_version in {doc}"
    );
    norm.value(None, &mut doc);
    let path = snapshot_path(name);
    let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
    if std::env::var_os("WEIGHTSMITH_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (WEIGHTSMITH_BLESS=1 writes it)", path.display())),
    )
    .unwrap();
    if let Some(d) = first_difference("", &expected, &doc) {
        panic!(
            "the {name} document changed at {d}\n(if intended: WEIGHTSMITH_BLESS=1 cargo test \
             -p weightsmith-tests --test json_snapshots, and review tests/snapshots/{name}.json)\n\
             whole document now:\n{text}"
        );
    }
}

fn tmp_normaliser(tmp: &Path) -> Normalise<'static> {
    Normalise {
        replacements: vec![(tmp.display().to_string(), "<TMP>")],
        host_bytes: &[],
    }
}

#[test]
fn inspect_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let norm = tmp_normaliser(tmp.path());
    check(
        "inspect",
        json_of(
            &["inspect", "fixtures/models/tiny-llama", "--json"],
            tmp.path(),
        ),
        &norm,
    );
    check(
        "inspect-tensors",
        json_of(
            &[
                "inspect",
                "fixtures/models/tiny-qwen2",
                "--json",
                "--tensors",
            ],
            tmp.path(),
        ),
        &norm,
    );
}

#[test]
fn plan_document() {
    let tmp = tempfile::tempdir().unwrap();
    check(
        "plan",
        json_of(
            &[
                "plan",
                "fixtures/models/tiny-llama",
                "--devices",
                "1GiB,1GiB",
                "--cache-seq-len",
                "64",
                "--strategy",
                "balanced",
                "--json",
            ],
            tmp.path(),
        ),
        &tmp_normaliser(tmp.path()),
    );
}

/// `merge` of the shipped Llama and LoRA into `out`, then `extra`.
fn merge_args<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "merge",
        "--base",
        "fixtures/models/tiny-llama",
        "--adapter",
        "fixtures/adapters/llama-lora/adapter",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn merge_document() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    check(
        "merge",
        json_of(&merge_args(&out, &["--verify", "--json"]), tmp.path()),
        &tmp_normaliser(tmp.path()),
    );
}

#[test]
fn load_document() {
    let tmp = tempfile::tempdir().unwrap();
    check(
        "load",
        json_of(
            &["load", "fixtures/models/tiny-llama", "--verify", "--json"],
            tmp.path(),
        ),
        &Normalise {
            replacements: vec![(tmp.path().display().to_string(), "<TMP>")],
            host_bytes: &["capacity_bytes", "free_after_bytes"],
        },
    );
}

#[test]
fn publish_documents() {
    let server = HubServer::start(TOKEN, Transfer::Basic);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let norm = Normalise {
        replacements: vec![
            (tmp.path().display().to_string(), "<TMP>"),
            (server.endpoint.clone(), "<ENDPOINT>"),
        ],
        host_bytes: &[],
    };
    let merge_push = json_of(
        &merge_args(
            &out,
            &[
                "--push-to",
                "me/tiny-merged",
                "--endpoint",
                &server.endpoint,
                "--token",
                TOKEN,
                "--json",
            ],
        ),
        tmp.path(),
    );
    check("merge-push", merge_push, &norm);
    let publish = |repo: &str| {
        json_of(
            &[
                "publish",
                out.to_str().unwrap(),
                "--repo",
                repo,
                "--endpoint",
                &server.endpoint,
                "--token",
                TOKEN,
                "--json",
            ],
            tmp.path(),
        )
    };
    // A second publish of the same folder: nothing to send, no commit.
    check("publish-unchanged", publish("me/tiny-merged"), &norm);
    // Into a second repository: every file committed.
    let fresh = publish("me/second");
    check("publish", fresh, &norm);
}

#[test]
fn a_changed_field_fails_the_comparison() {
    // The comparison itself: a renamed key, a retyped value and a changed number are each
    // reported at their place.
    let a = serde_json::json!({"x": {"y": [1, 2]}, "z": "s"});
    let renamed = serde_json::json!({"x": {"y2": [1, 2]}, "z": "s"});
    let retyped = serde_json::json!({"x": {"y": [1, "2"]}, "z": "s"});
    let changed = serde_json::json!({"x": {"y": [1, 3]}, "z": "s"});
    assert!(first_difference("", &a, &a).is_none());
    assert!(first_difference("", &a, &renamed)
        .unwrap()
        .starts_with("/x/y:"));
    assert!(first_difference("", &a, &retyped)
        .unwrap()
        .starts_with("/x/y/1:"));
    assert!(first_difference("", &a, &changed)
        .unwrap()
        .starts_with("/x/y/1:"));
}
