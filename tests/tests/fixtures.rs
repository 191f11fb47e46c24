//! Checkpoints written by Python `safetensors` and `transformers.save_pretrained` (committed
//! fixtures, made by scripts/fixtures/make_fixtures.py) read back exactly as those libraries read them.

use serde_json::Value;
use st_io::layout::UnitKind;
use st_io::{Checkpoint, LayoutKind};
use weightsmith_tests::{fixture, sha256_hex, MODELS};

fn manifest(path: &str) -> Value {
    let text = std::fs::read_to_string(fixture(path)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_matches_manifest(
    c: &Checkpoint,
    tensors: &serde_json::Map<String, Value>,
    with_files: bool,
) {
    assert_eq!(c.tensors().len(), tensors.len());
    for (name, expected) in tensors {
        let t = c.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.dtype.name(), expected["dtype"], "{name}");
        let shape: Vec<u64> = expected["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(sha256_hex(c.tensor_bytes(t)), expected["sha256"], "{name}");
        if with_files {
            assert_eq!(c.files()[t.file].name, expected["file"], "{name}");
        }
    }
}

#[test]
fn reads_every_dtype_written_by_python_safetensors() {
    let m = manifest("python/all-dtypes.json");
    let c = Checkpoint::open(fixture("python/all-dtypes.safetensors")).unwrap();
    assert_eq!(c.kind(), LayoutKind::SingleFile);
    let tensors = m["tensors"].as_object().unwrap();
    assert!(
        tensors.len() >= 17,
        "fixture covers F8 variants and unsigned types"
    );
    assert_matches_manifest(&c, tensors, false);
    let metadata = c.files()[0].metadata.clone().unwrap();
    assert!(metadata.contains(&("format".to_string(), "pt".to_string())));
}

#[test]
fn reads_every_model_saved_by_transformers() {
    for name in MODELS {
        let m = manifest(&format!("models/{name}.manifest.json"));
        let c = Checkpoint::open(fixture(&format!("models/{name}"))).unwrap();
        assert_matches_manifest(&c, m["tensors"].as_object().unwrap(), true);
        let files: Vec<&str> = c.files().iter().map(|f| f.name.as_str()).collect();
        let expected_files: Vec<&str> = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        assert_eq!(files, expected_files, "{name}");
        assert!(c.problems().is_empty(), "{name}: {:?}", c.problems());
    }
}

#[test]
fn groups_every_fixture_into_the_expected_units() {
    for name in MODELS {
        let m = manifest(&format!("models/{name}.manifest.json"));
        let c = Checkpoint::open(fixture(&format!("models/{name}"))).unwrap();
        let layout = c.layout();
        let layers = m["num_hidden_layers"].as_u64().unwrap();
        let mut expected = vec!["embedding".to_string()];
        expected.extend((0..layers).map(|i| format!("layers.{i}")));
        expected.push("norm".into());
        expected.push("head".into());
        let names: Vec<String> = layout.units.iter().map(|u| u.name.clone()).collect();
        assert_eq!(names, expected, "{name}: {:?}", layout.notes);
        assert!(layout.notes.is_empty(), "{name}: {:?}", layout.notes);
        let tied = m["tie_word_embeddings"].as_bool().unwrap();
        assert_eq!(layout.tied_embeddings, tied, "{name}");
        let head = layout
            .units
            .iter()
            .find(|u| u.kind == UnitKind::Head)
            .unwrap();
        assert_eq!(head.bytes == 0, tied, "{name}: a tied head holds no bytes");
        assert_eq!(
            layout.total_bytes(),
            c.total_tensor_bytes(),
            "{name}: every byte in a unit once"
        );
    }
}

#[test]
fn reads_config_facts_of_the_fixtures() {
    let c = Checkpoint::open(fixture("models/tiny-llama")).unwrap();
    let cfg = c.config().unwrap();
    assert_eq!(cfg.architectures, ["LlamaForCausalLM"]);
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.kv_heads(),
            cfg.head_dim()
        ),
        (Some(3), Some(64), Some(2), Some(16))
    );
    assert_eq!(cfg.torch_dtype.as_deref(), Some("bfloat16"));
    let c = Checkpoint::open(fixture("models/tiny-mistral")).unwrap();
    assert_eq!(c.config().unwrap().sliding_window, Some(16));
    let c = Checkpoint::open(fixture("models/tiny-gpt2")).unwrap();
    let cfg = c.config().unwrap();
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads
        ),
        (Some(2), Some(32), Some(4))
    );
    assert_eq!(c.layout().layer_prefix.as_deref(), Some("transformer.h"));
}
