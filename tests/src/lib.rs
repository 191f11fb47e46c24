//! Helpers for the end-to-end tests: where the repository's fixtures are, and how to run the
//! `weightsmith` binary that the workspace builds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};
use st_io::{Checkpoint, Dtype};

pub mod hub_server;

/// The repository root (WEIGHTSMITH_REPO overrides it, for test executables carried to
/// another machine by scripts/gpu-check.sh).
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("WEIGHTSMITH_REPO") {
        return PathBuf::from(root);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository root")
        .to_path_buf()
}

/// A path under `fixtures/`.
pub fn fixture(relative: &str) -> PathBuf {
    repo_root().join("fixtures").join(relative)
}

/// A copy of the fixture folder `relative` in `parent` (for tests that change their input),
/// under the fixture's own folder name; returns the copy's path.
pub fn copy_fixture(relative: &str, parent: &Path) -> PathBuf {
    let from = fixture(relative);
    let to = parent.join(from.file_name().expect("a fixture folder"));
    std::fs::create_dir_all(&to).expect("create the copy");
    for entry in std::fs::read_dir(&from).expect("read the fixture") {
        let entry = entry.expect("read the fixture");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy a fixture file");
    }
    to
}

/// The names of the tiny model fixtures (`fixtures/models/<name>/`).
pub const MODELS: &[&str] = &[
    "tiny-gemma",
    "tiny-gpt2",
    "tiny-llama",
    "tiny-mistral",
    "tiny-mixtral",
    "tiny-phi3",
    "tiny-qwen2",
];

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `weightsmith` binary of this workspace's target directory, built if missing
/// (WEIGHTSMITH_BIN overrides it).
pub fn weightsmith_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WEIGHTSMITH_BIN") {
        return PathBuf::from(bin);
    }
    // The test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("weightsmith");
    // Built (or found fresh) once per test process, so a stale binary is never tested. The
    // whole workspace's binaries, not `-p weightsmith`: the workspace resolves the same
    // dependency features as `cargo test --workspace` (the root Cargo.toml turns on what only
    // dev-dependencies would), so the build reuses the test build's dependencies instead of
    // compiling the tree again with other features.
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo_root())
            .args(["build", "--quiet", "--workspace", "--bins"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the weightsmith binary failed");
    });
    bin
}

/// Runs `weightsmith ARGS` and returns its output.
pub fn weightsmith(args: &[&str]) -> Output {
    Command::new(weightsmith_bin())
        .args(args)
        .output()
        .expect("run weightsmith")
}

/// How a merged checkpoint compares with a reference merge of the same base.
pub struct Outcome {
    /// The largest difference of one value, in ulps at the scale of max(|W|, |W'|, |W_ref'|).
    pub max_ulps: u32,
    /// Tensors the reference changed from the base.
    pub changed: usize,
}

/// Compares `ours` with `reference` tensor by tensor: the same names, dtypes and shapes (a
/// panic naming the tensor otherwise), and the largest difference of a value in ulps.
///
/// The ulp is taken at the scale of max(|W|, |W'|): PEFT rounds ΔW to 16 bits before adding
/// it, so where W and ΔW nearly cancel its error is a fraction of ΔW's ulp, which can be many
/// ulps of the small result. Measured at that scale the two merges differ by at most one ulp.
pub fn compare_with_reference(
    ours: &Checkpoint,
    reference: &Checkpoint,
    base: &Checkpoint,
) -> Outcome {
    let mut names: Vec<&str> = ours.tensors().iter().map(|t| t.name.as_str()).collect();
    let mut expected: Vec<&str> = reference
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    names.sort();
    expected.sort();
    assert_eq!(names, expected, "tensor names");
    let mut outcome = Outcome {
        max_ulps: 0,
        changed: 0,
    };
    for t in reference.tensors() {
        let o = ours.tensor(&t.name).unwrap();
        assert_eq!((o.dtype, &o.shape), (t.dtype, &t.shape), "{}", t.name);
        let (a, b) = (ours.tensor_bytes(o), reference.tensor_bytes(t));
        if !t.dtype.is_half() {
            assert!(a == b, "{}: {} tensor differs", t.name, t.dtype);
            continue;
        }
        let w = match base.tensor(&t.name) {
            Some(bt) if bt.shape == t.shape => {
                st_io::convert::convert_to_vec(bt.dtype, t.dtype, base.tensor_bytes(bt)).unwrap()
            }
            _ => vec![0u8; b.len()],
        };
        let value = |x: &[u8]| -> f32 {
            let bits = u16::from_le_bytes([x[0], x[1]]);
            if t.dtype == Dtype::F16 {
                half::f16::from_bits(bits).to_f32()
            } else {
                half::bf16::from_bits(bits).to_f32()
            }
        };
        let mantissa_bits = if t.dtype == Dtype::F16 { 10 } else { 7 };
        let min_exp = if t.dtype == Dtype::F16 { -14 } else { -126 };
        let mut worst = 0u32;
        for ((x, y), z) in a
            .chunks_exact(2)
            .zip(b.chunks_exact(2))
            .zip(w.chunks_exact(2))
        {
            let (x, y, z) = (value(x), value(y), value(z));
            let scale = x.abs().max(y.abs()).max(z.abs());
            let exp = if scale == 0.0 {
                min_exp
            } else {
                (scale.log2().floor() as i32).max(min_exp)
            };
            let ulp = 2f32.powi(exp - mantissa_bits);
            let d = ((x - y).abs() / ulp).ceil() as u32;
            worst = worst.max(d);
        }
        outcome.max_ulps = outcome.max_ulps.max(worst);
        if base.tensor(&t.name).is_some() && w != b {
            outcome.changed += 1;
        }
    }
    outcome
}

/// The dimensions of a Llama-shaped checkpoint made of headers only.
pub struct LlamaShape {
    pub layers: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub vocab: u64,
    pub heads: u64,
    pub kv_heads: u64,
}

impl LlamaShape {
    pub const LLAMA_3_70B: LlamaShape = LlamaShape {
        layers: 80,
        hidden: 8192,
        intermediate: 28672,
        vocab: 128256,
        heads: 64,
        kv_heads: 8,
    };
    pub const LLAMA_3_405B: LlamaShape = LlamaShape {
        layers: 126,
        hidden: 16384,
        intermediate: 53248,
        vocab: 128256,
        heads: 128,
        kv_heads: 8,
    };
}

/// A safetensors header for `tensors` (name, BF16 shape) laid out one after another; with the
/// file's whole length.
pub fn bf16_header(tensors: &[(String, Vec<u64>)]) -> (Vec<u8>, u64) {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let len = shape.iter().product::<u64>() * 2;
        map.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(map)).expect("JSON");
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    let total = out.len() as u64 + offset;
    (out, total)
}

/// The files of a Llama-shaped repository in `shards` shards whose data are zeros the server
/// never holds (sparse), with config.json and the index; and the bytes of tensor data.
pub fn llama_shaped_files(
    shape: &LlamaShape,
    shards: usize,
) -> (Vec<(String, hub_server::StoredFile)>, u64) {
    let (h, inter, vocab) = (shape.hidden, shape.intermediate, shape.vocab);
    let kv = shape.kv_heads * (h / shape.heads);
    let mut tensors: Vec<(String, Vec<u64>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, h])];
    for i in 0..shape.layers {
        for (n, s) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![inter, h]),
            ("mlp.up_proj.weight", vec![inter, h]),
            ("mlp.down_proj.weight", vec![h, inter]),
        ] {
            tensors.push((format!("model.layers.{i}.{n}"), s));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![h]));
    tensors.push(("lm_head.weight".into(), vec![vocab, h]));
    let per = tensors.len().div_ceil(shards.max(1));
    let count = tensors.len().div_ceil(per);
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0;
    for (k, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", k + 1, count);
        let (header, len) = bf16_header(chunk);
        total_size += len - header.len() as u64;
        for (t, _) in chunk {
            weight_map.insert(t.clone(), serde_json::json!(name));
        }
        files.push((
            name,
            hub_server::StoredFile {
                content: header,
                lfs: true,
                sparse_len: Some(len),
                ..hub_server::StoredFile::default()
            },
        ));
    }
    let index =
        serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    files.push((
        "model.safetensors.index.json".into(),
        hub_server::StoredFile::new(serde_json::to_vec_pretty(&index).expect("JSON"), false),
    ));
    let config = serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "vocab_size": vocab,
        "max_position_embeddings": 131072, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5});
    files.push((
        "config.json".into(),
        hub_server::StoredFile::new(serde_json::to_vec_pretty(&config).expect("JSON"), false),
    ));
    (files, total_size)
}

/// Whether something a test needs (`what`: `GPU`, `PYTHON`, …) is here. When it is not, the
/// test says so on stderr every time, and fails when `WEIGHTSMITH_REQUIRE_<what>` is set
/// (`scripts/gpu-check.sh` sets the GPU one, `.ci/run` the Python one): a skip is never
/// silent, and never passes where the thing was promised.
pub fn available(what: &str, present: bool, why_skipped: &str) -> bool {
    if present {
        return true;
    }
    let switch = format!("WEIGHTSMITH_REQUIRE_{what}");
    if std::env::var_os(&switch).is_some() {
        panic!("{switch} is set, but {why_skipped}");
    }
    eprintln!("skipped ({switch} unset): {why_skipped}");
    false
}

/// Whether a CUDA GPU is usable here (see [`available`]).
pub fn gpu_available() -> bool {
    let n = weightsmith::gpu_mem::discover()
        .map(|d| d.len())
        .unwrap_or(0);
    available(
        "GPU",
        n > 0,
        "no CUDA GPU is usable here; the GPU = CPU comparison runs in scripts/gpu-check.sh",
    )
}

/// The names in `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
