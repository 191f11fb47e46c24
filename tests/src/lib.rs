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
