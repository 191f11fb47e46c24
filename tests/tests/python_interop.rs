//! Files our writer produces, read back by Python `safetensors` (the reference reader).
//!
//! Runs when `python3` can import `safetensors` and `numpy`; skipped otherwise, unless
//! WEIGHTSMITH_REQUIRE_PYTHON=1 (set by .ci/run, which installs both) makes that a failure.

use std::process::Command;

use serde_json::Value;
use st_io::{Dtype, ShardWriter, TensorSpec, WriterOptions};
use weightsmith_tests::sha256_hex;

const READER: &str = r#"
import hashlib, json, os, sys
import safetensors
folder = sys.argv[1]
out = {"tensors": {}, "files": sorted(os.listdir(folder))}
for f in out["files"]:
    if f.endswith(".safetensors"):
        with open(os.path.join(folder, f), "rb") as fh:
            for name, t in safetensors.deserialize(fh.read()):
                out["tensors"][name] = {"dtype": t["dtype"], "shape": list(t["shape"]), "file": f,
                                        "sha256": hashlib.sha256(bytes(t["data"])).hexdigest()}
        with safetensors.safe_open(os.path.join(folder, f), framework="numpy") as fh:
            out.setdefault("metadata", {})[f] = fh.metadata()
index = os.path.join(folder, "model.safetensors.index.json")
if os.path.exists(index):
    out["index"] = json.load(open(index))
print(json.dumps(out))
"#;

fn python_with_safetensors() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok && std::env::var("WEIGHTSMITH_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("WEIGHTSMITH_REQUIRE_PYTHON=1 but python3 cannot import safetensors and numpy");
    }
    ok
}

#[test]
fn python_safetensors_reads_what_we_write() {
    if !python_with_safetensors() {
        eprintln!("skipped: python3 with safetensors and numpy not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    let dtypes = [
        Dtype::BF16,
        Dtype::F16,
        Dtype::F32,
        Dtype::F8_E4M3,
        Dtype::F8_E5M2,
        Dtype::BOOL,
        Dtype::I64,
        Dtype::U8,
        Dtype::F64,
    ];
    let specs: Vec<TensorSpec> = (0..24)
        .map(|i| {
            TensorSpec::new(
                format!("model.layers.{i}.weight"),
                dtypes[i % dtypes.len()],
                vec![(i as u64 % 5) + 1, 17],
            )
        })
        .chain([
            TensorSpec::new("scalar", Dtype::F32, vec![]),
            TensorSpec::new("empty", Dtype::BF16, vec![0, 3]),
        ])
        .collect();
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (0..s.bytes().unwrap())
                .map(|j| {
                    if s.dtype == Dtype::BOOL {
                        (j % 2) as u8
                    } else {
                        (j as u8).wrapping_mul(13).wrapping_add(i as u8)
                    }
                })
                .collect()
        })
        .collect();
    let options = WriterOptions {
        max_shard_bytes: 400,
        ..WriterOptions::default()
    };
    let mut w = ShardWriter::create(&dest, specs.clone(), options).unwrap();
    for (s, d) in specs.iter().zip(&data) {
        w.write_tensor(&s.name, d).unwrap();
    }
    let summary = w.finish().unwrap();
    let out = Command::new("python3")
        .args(["-c", READER, dest.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tensors = seen["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), specs.len());
    for (s, d) in specs.iter().zip(&data) {
        let t = &tensors[&s.name];
        assert_eq!(t["dtype"], s.dtype.name(), "{}", s.name);
        assert_eq!(t["shape"], serde_json::json!(s.shape), "{}", s.name);
        assert_eq!(t["sha256"], sha256_hex(d), "{}", s.name);
        assert_eq!(
            seen["index"]["weight_map"][&s.name], t["file"],
            "{}",
            s.name
        );
    }
    let total: u64 = specs.iter().map(|s| s.bytes().unwrap()).sum();
    assert_eq!(seen["index"]["metadata"]["total_size"], total);
    for (f, meta) in seen["metadata"].as_object().unwrap() {
        assert_eq!(meta, &serde_json::json!({"format": "pt"}), "{f}");
    }
    assert!(
        summary.files.len() > 3,
        "the test should cover several shards"
    );
}
