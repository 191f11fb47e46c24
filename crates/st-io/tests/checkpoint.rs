//! Opening files and folders: the Hugging Face layouts, and every way an index, a shard or a
//! config can be wrong.

use std::path::Path;

use st_io::header::{encode_header, HeaderTensor};
use st_io::{Checkpoint, Dtype, Error, LayoutKind};

/// Writes a safetensors file holding U8 tensors of the given names and lengths.
fn write_st(path: &Path, tensors: &[(&str, u64)]) {
    let mut offset = 0;
    let entries: Vec<HeaderTensor> = tensors
        .iter()
        .map(|(name, len)| {
            let t = HeaderTensor {
                name: name.to_string(),
                dtype: Dtype::U8,
                shape: vec![*len],
                begin: offset,
                end: offset + len,
            };
            offset += len;
            t
        })
        .collect();
    let mut bytes = encode_header(&[("format".into(), "pt".into())], &entries);
    bytes.extend((0..offset).map(|i| i as u8));
    std::fs::write(path, bytes).unwrap();
}

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";
/// The index of the folder `sharded` writes.
const MAP: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", SHARD1),
    ("model.layers.0.mlp.weight", SHARD1),
    ("model.layers.1.mlp.weight", SHARD2),
    ("model.norm.weight", SHARD2),
    ("lm_head.weight", SHARD2),
];

fn write_index(dir: &Path, total: u64, map: &[(&str, &str)]) {
    let weight_map: serde_json::Map<String, serde_json::Value> = map
        .iter()
        .map(|(t, f)| (t.to_string(), serde_json::Value::String(f.to_string())))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

const CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","num_hidden_layers":2,"hidden_size":8,"num_attention_heads":2,"tie_word_embeddings":false}"#;

/// A valid two-shard folder.
fn sharded(dir: &Path) {
    write_st(
        &dir.join("model-00001-of-00002.safetensors"),
        &[
            ("model.embed_tokens.weight", 16),
            ("model.layers.0.mlp.weight", 8),
        ],
    );
    write_st(
        &dir.join("model-00002-of-00002.safetensors"),
        &[
            ("model.layers.1.mlp.weight", 8),
            ("model.norm.weight", 2),
            ("lm_head.weight", 16),
        ],
    );
    write_index(dir, 50, MAP);
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
}

#[test]
fn opens_a_sharded_folder_with_zero_copy_views() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    let c = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(c.kind(), LayoutKind::Sharded);
    assert_eq!(c.files().len(), 2);
    assert_eq!(c.tensors().len(), 5);
    assert_eq!(c.total_tensor_bytes(), 50);
    assert!(c.problems().is_empty(), "{:?}", c.problems());
    let t = c.tensor("model.layers.1.mlp.weight").unwrap();
    assert_eq!(c.files()[t.file].name, "model-00002-of-00002.safetensors");
    assert_eq!(c.tensor_bytes(t), &[0, 1, 2, 3, 4, 5, 6, 7]);
    let lm = c.tensor("lm_head.weight").unwrap();
    assert_eq!(c.tensor_bytes(lm)[0], 10);
    let names: Vec<_> = c.layout().units.iter().map(|u| u.name.clone()).collect();
    assert_eq!(names, ["embedding", "layers.0", "layers.1", "norm", "head"]);
    assert_eq!(c.config().unwrap().num_hidden_layers, Some(2));
    // The index file itself opens the folder too.
    let c = Checkpoint::open(dir.path().join("model.safetensors.index.json")).unwrap();
    assert_eq!(c.tensors().len(), 5);
}

#[test]
fn opens_single_file_folders_and_files() {
    let dir = tempfile::tempdir().unwrap();
    write_st(
        &dir.path().join("model.safetensors"),
        &[("transformer.wte.weight", 4)],
    );
    let c = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(c.kind(), LayoutKind::Folder);
    assert!(c.problems()[0].message.contains("no config.json"));
    let c = Checkpoint::open(dir.path().join("model.safetensors")).unwrap();
    assert_eq!(c.kind(), LayoutKind::SingleFile);
    // A folder with one differently named safetensors file.
    let other = tempfile::tempdir().unwrap();
    write_st(
        &other.path().join("consolidated.safetensors"),
        &[("tok_embeddings.weight", 4)],
    );
    assert_eq!(
        Checkpoint::open(other.path()).unwrap().files()[0].name,
        "consolidated.safetensors"
    );
}

#[test]
fn rejects_folders_without_usable_weights() {
    let dir = tempfile::tempdir().unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("no safetensors weights in this folder"), "{e}");
    std::fs::write(dir.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("convert them to safetensors"), "{e}");
    let e = Checkpoint::open(dir.path().join("pytorch_model.bin"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pytorch_model.bin: PyTorch pickle weights are not read"),
        "{e}"
    );
    write_st(&dir.path().join("a.safetensors"), &[("x", 1)]);
    write_st(&dir.path().join("b.safetensors"), &[("y", 1)]);
    let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("2 .safetensors files and no model.safetensors.index.json"),
        "{e}"
    );
    let e = Checkpoint::open(dir.path().join("missing")).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(e.to_string().ends_with("missing: no such file or folder"));
}

#[test]
fn rejects_an_index_naming_a_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, Error::MissingShard { ref shard, .. } if shard == "model-00002-of-00002.safetensors"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("(named for tensor \"lm_head.weight\") does not exist"),
        "{e}"
    );
}

#[test]
fn rejects_a_tensor_missing_from_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    write_index(
        dir.path(),
        50,
        &[MAP, &[("model.layers.2.mlp.weight", SHARD2)]].concat(),
    );
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, Error::TensorMissingFromShard { ref tensor, .. } if tensor == "model.layers.2.mlp.weight"),
        "{e}"
    );
}

#[test]
fn rejects_a_shard_tensor_absent_from_the_index_or_mapped_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    write_index(dir.path(), 50, &MAP[..4]);
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: tensor \"lm_head.weight\" of shard \"model-00002-of-00002.safetensors\" is not in the index",
            dir.path().join("model.safetensors.index.json").display()
        )
    );
    write_index(
        dir.path(),
        50,
        &[
            (
                "model.embed_tokens.weight",
                "model-00001-of-00002.safetensors",
            ),
            (
                "model.layers.0.mlp.weight",
                "model-00002-of-00002.safetensors",
            ),
            (
                "model.layers.1.mlp.weight",
                "model-00002-of-00002.safetensors",
            ),
            ("model.norm.weight", "model-00002-of-00002.safetensors"),
            ("lm_head.weight", "model-00002-of-00002.safetensors"),
        ],
    );
    let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("(the index maps it to \"model-00002-of-00002.safetensors\")"),
        "{e}"
    );
}

#[test]
fn rejects_shard_names_that_leave_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    write_st(&dir.path().join("outside.safetensors"), &[("x", 1)]);
    for (name, reason) in [
        ("../outside.safetensors", "contains '..'"),
        ("/etc/passwd", "is an absolute path"),
        ("sub/../../outside.safetensors", "contains '..'"),
        ("", "is empty"),
    ] {
        write_index(&model, 1, &[("x", name)]);
        let e = Checkpoint::open(&model).unwrap_err();
        assert!(matches!(e, Error::ShardOutsideFolder { .. }), "{name}: {e}");
        assert!(e.to_string().contains(reason), "{name}: {e}");
    }
    // A symlink pointing out of the folder.
    std::os::unix::fs::symlink(
        dir.path().join("outside.safetensors"),
        model.join("link.safetensors"),
    )
    .unwrap();
    write_index(&model, 1, &[("x", "link.safetensors")]);
    let e = Checkpoint::open(&model).unwrap_err();
    assert!(e.to_string().contains("a symlink out of the folder"), "{e}");
    // The same through the single-file layout.
    std::fs::remove_file(model.join("model.safetensors.index.json")).unwrap();
    std::fs::rename(
        model.join("link.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    let e = Checkpoint::open(&model).unwrap_err();
    assert!(e.to_string().contains("a symlink out of the folder"), "{e}");
}

#[test]
fn accepts_the_hugging_face_cache_layout() {
    // <repo>/snapshots/<rev>/model.safetensors -> ../../blobs/<hash>
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models--org--name");
    let snapshot = repo.join("snapshots").join("abc123");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    write_st(
        &repo.join("blobs").join("e3b0c442"),
        &[("model.embed_tokens.weight", 4)],
    );
    std::os::unix::fs::symlink("../../blobs/e3b0c442", snapshot.join("model.safetensors")).unwrap();
    let c = Checkpoint::open(&snapshot).unwrap();
    assert_eq!(c.tensors().len(), 1);
}

#[test]
fn reports_stale_shards_and_wrong_total_size() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    write_index(dir.path(), 49, MAP);
    write_st(
        &dir.path().join("model-00001-of-00003.safetensors"),
        &[("old", 1)],
    );
    let c = Checkpoint::open(dir.path()).unwrap();
    let messages: Vec<_> = c
        .problems()
        .iter()
        .map(|p| format!("{}: {}", p.subject, p.message))
        .collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages[0].contains("total_size says 49 bytes but the shards hold 50"));
    assert!(messages[1].starts_with(
        "model-00001-of-00003.safetensors: this .safetensors file is not named by the index"
    ));
}

#[test]
fn rejects_malformed_index_files() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    let index = dir.path().join("model.safetensors.index.json");
    for (text, needle) in [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        (r#"{"metadata":{}}"#, "missing \"weight_map\""),
        (r#"{"weight_map":[]}"#, "\"weight_map\" must be an object"),
        (r#"{"weight_map":{}}"#, "\"weight_map\" is empty"),
        (
            r#"{"weight_map":{"a":3}}"#,
            "\"weight_map\" entry \"a\" must name a file",
        ),
        (
            r#"{"metadata":{"total_size":"big"},"weight_map":{"a":"b"}}"#,
            "total_size",
        ),
    ] {
        std::fs::write(&index, text).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert!(matches!(e, Error::BadIndex { .. }), "{text}: {e}");
        assert!(e.to_string().contains(needle), "{text}: {e}");
        assert!(
            e.to_string().starts_with(&index.display().to_string()),
            "{e}"
        );
    }
}

#[test]
fn rejects_a_malformed_config_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    std::fs::write(dir.path().join("config.json"), "{\"num_hidden_layers\": }").unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e, Error::BadConfig { .. }), "{e}");
    assert!(e.to_string().contains("config.json: not valid JSON"), "{e}");
}

#[test]
fn rejects_a_truncated_shard_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 3]).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, Error::OffsetOutOfBounds { ref tensor, .. } if tensor == "lm_head.weight"),
        "{e}"
    );
    assert!(
        e.to_string().starts_with(&shard.display().to_string()),
        "{e}"
    );
}

#[test]
fn rejects_the_same_tensor_in_two_single_files() {
    // Two shards both holding "x" while the index names only one of them.
    let dir = tempfile::tempdir().unwrap();
    write_st(&dir.path().join("a.safetensors"), &[("x", 1)]);
    write_st(&dir.path().join("b.safetensors"), &[("x", 1), ("y", 1)]);
    write_index(
        dir.path(),
        3,
        &[("x", "a.safetensors"), ("y", "b.safetensors")],
    );
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(e.to_string().contains("\"x\""), "{e}");
}
