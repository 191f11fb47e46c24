//! `weightsmith inspect` as a user runs it: the README's command, JSON output, and a corpus of
//! malformed inputs each ending in a one-line error that names the problem.

use std::path::Path;

use serde_json::Value;
use weightsmith_tests::{fixture, sha256_hex, weightsmith, MODELS};

fn run_ok(args: &[&str]) -> String {
    let out = weightsmith(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn inspects_the_shipped_checkpoint_as_the_readme_says() {
    let path = fixture("models/tiny-llama");
    let text = run_ok(&["inspect", path.to_str().unwrap()]);
    for needle in [
        "layout:   sharded folder with index, 3 file(s)",
        "tensors:  30 (287.62 KB of data)",
        "BF16 ×30",
        "LlamaForCausalLM (llama), 3 layers, hidden 64, heads 4, kv heads 2, head dim 16, vocab 256",
        "tied embeddings: no",
        "layers.2",
        "problems: none",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[test]
fn prints_one_json_document_with_the_documented_schema() {
    for name in MODELS {
        let path = fixture(&format!("models/{name}"));
        let json: Value =
            serde_json::from_str(&run_ok(&["inspect", path.to_str().unwrap(), "--json"])).unwrap();
        assert_eq!(json["schema_version"], 1);
        for key in [
            "path",
            "layout",
            "files",
            "tensor_count",
            "total_bytes",
            "dtypes",
            "config",
            "units",
            "problems",
            "tied_embeddings",
            "layer_prefix",
        ] {
            assert!(json.get(key).is_some(), "{name}: no {key}");
        }
        assert!(json.get("tensors").is_none(), "tensors only with --tensors");
        let units = json["units"].as_array().unwrap();
        assert_eq!(units[0]["name"], "embedding");
        assert_eq!(units.last().unwrap()["name"], "head");
        let unit_bytes: u64 = units.iter().map(|u| u["bytes"].as_u64().unwrap()).sum();
        assert_eq!(unit_bytes, json["total_bytes"].as_u64().unwrap());
    }
    let path = fixture("models/tiny-llama");
    let json: Value = serde_json::from_str(&run_ok(&[
        "inspect",
        path.to_str().unwrap(),
        "--json",
        "--tensors",
    ]))
    .unwrap();
    let tensors = json["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 30);
    let t = tensors
        .iter()
        .find(|t| t["name"] == "model.layers.1.mlp.up_proj.weight")
        .unwrap();
    assert_eq!(t["unit"], "layers.1");
    assert_eq!(t["dtype"], "BF16");
    assert_eq!(t["shape"], serde_json::json!([128, 64]));
    assert_eq!(t["bytes"], 128 * 64 * 2);
    assert_eq!(json["config"]["num_hidden_layers"], 3);
    assert_eq!(json["layout"], "sharded");
}

#[test]
fn lists_tensors_in_text() {
    let path = fixture("python/all-dtypes.safetensors");
    let text = run_ok(&["inspect", path.to_str().unwrap(), "--tensors"]);
    assert!(text.contains("t.f8_e4m3"), "{text}");
    assert!(text.contains("F8_E5M2"), "{text}");
    assert!(text.contains("no config.json beside the file"), "{text}");
}

fn st_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Runs inspect on a malformed input and checks: exit ≠ 0, nothing on stdout, one line on
/// stderr naming the problem, and the input left untouched.
fn assert_rejected(path: &Path, needles: &[&str]) {
    let before = hash_tree(path);
    let out = weightsmith(&["inspect", path.to_str().unwrap()]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "{}: accepted", path.display());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in {stderr}");
    }
    assert_eq!(hash_tree(path), before, "the input changed");
}

fn hash_tree(path: &Path) -> Vec<(String, String)> {
    if path.is_file() {
        return vec![(
            path.display().to_string(),
            sha256_hex(&std::fs::read(path).unwrap()),
        )];
    }
    let mut entries: Vec<(String, String)> = std::fs::read_dir(path)
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| p.is_file())
                .map(|p| {
                    (
                        p.display().to_string(),
                        sha256_hex(&std::fs::read(&p).unwrap()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    entries
}

#[test]
fn rejects_each_malformed_file_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "short.safetensors",
            vec![1, 2, 3],
            vec!["short.safetensors: file is 3 bytes"],
        ),
        (
            "past-end.safetensors",
            {
                let mut b = 999u64.to_le_bytes().to_vec();
                b.extend(b"{}");
                b
            },
            vec!["header length 999 runs past the end"],
        ),
        (
            "huge.safetensors",
            u64::MAX.to_le_bytes().to_vec(),
            vec!["over the 100 MB limit"],
        ),
        (
            "not-utf8.safetensors",
            {
                let mut b = 2u64.to_le_bytes().to_vec();
                b.extend([b'{', 0xff]);
                b
            },
            vec!["header is not UTF-8"],
        ),
        (
            "not-json.safetensors",
            st_file("{\"a\":", &[]),
            vec!["header is not valid JSON"],
        ),
        (
            "dtype.safetensors",
            st_file(
                r#"{"a":{"dtype":"F3","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            vec!["tensor \"a\" has unknown dtype \"F3\""],
        ),
        (
            "size.safetensors",
            st_file(
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            vec!["tensor \"a\" has 8 bytes but shape [3] of F32 needs 12"],
        ),
        (
            "bounds.safetensors",
            st_file(ok, &[0; 4]),
            vec!["tensor \"a\" ends at data offset 8, past the 4-byte data area"],
        ),
        (
            "overlap.safetensors",
            st_file(
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#,
                &[0; 5],
            ),
            vec!["tensors \"a\" and \"b\" overlap"],
        ),
        (
            "gap.safetensors",
            st_file(ok, &[0; 12]),
            vec!["data bytes [8, 12) belong to no tensor"],
        ),
        (
            "dup.safetensors",
            st_file(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                &[0; 2],
            ),
            vec!["tensor \"a\" appears twice"],
        ),
    ];
    for (name, bytes, needles) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let mut needles = needles;
        needles.push(name);
        assert_rejected(&path, &needles);
    }
}

#[test]
fn rejects_broken_folders_with_an_error_naming_the_problem() {
    let copy = |dir: &Path| {
        let src = fixture("models/tiny-llama");
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    };
    let index_name = "model.safetensors.index.json";
    let edit_index = |dir: &Path, f: &dyn Fn(&mut Value)| {
        let path = dir.join(index_name);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    };

    let d = tempfile::tempdir().unwrap();
    copy(d.path());
    std::fs::remove_file(d.path().join("model-00003-of-00003.safetensors")).unwrap();
    assert_rejected(
        d.path(),
        &[
            index_name,
            "shard \"model-00003-of-00003.safetensors\"",
            "does not exist",
        ],
    );

    let d = tempfile::tempdir().unwrap();
    copy(d.path());
    edit_index(d.path(), &|v| {
        v["weight_map"]["model.layers.9.x.weight"] = "model-00001-of-00003.safetensors".into();
    });
    assert_rejected(d.path(), &["tensor \"model.layers.9.x.weight\" is mapped to shard \"model-00001-of-00003.safetensors\" but that shard does not contain it"]);

    let d = tempfile::tempdir().unwrap();
    copy(d.path());
    edit_index(d.path(), &|v| {
        v["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove("lm_head.weight");
    });
    assert_rejected(
        d.path(),
        &["tensor \"lm_head.weight\"", "is not in the index"],
    );

    let d = tempfile::tempdir().unwrap();
    copy(d.path());
    edit_index(d.path(), &|v| {
        v["weight_map"]["lm_head.weight"] = "../model-00003-of-00003.safetensors".into();
    });
    assert_rejected(d.path(), &["must stay inside the checkpoint folder"]);

    let d = tempfile::tempdir().unwrap();
    copy(d.path());
    std::fs::write(d.path().join("config.json"), "{\"num_hidden_layers\": [").unwrap();
    assert_rejected(d.path(), &["config.json: not valid JSON"]);

    let d = tempfile::tempdir().unwrap();
    copy(d.path());
    std::fs::write(
        d.path().join("config.json"),
        "{\"num_attention_heads\": -4}",
    )
    .unwrap();
    assert_rejected(
        d.path(),
        &["config.json: field \"num_attention_heads\": expected a non-negative integer, found -4"],
    );

    let d = tempfile::tempdir().unwrap();
    assert_rejected(d.path(), &["no safetensors weights in this folder"]);
    assert_rejected(&d.path().join("nope"), &["nope: no such file or folder"]);
}

#[test]
fn a_usage_error_exits_2() {
    let out = weightsmith(&["inspect"]);
    assert_eq!(out.status.code(), Some(2));
    let out = weightsmith(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}
