//! One test per merge refusal: each builds the input a user could really hand us (a fixture
//! adapter or base with one thing wrong, written with the `safetensors` crate), runs `weightsmith
//! merge`, and checks that it exits ≠ 0 with a message naming the adapter, module or tensor,
//! that no output folder is left behind, and that the inputs are unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use weightsmith_tests::{copy_fixture, fixture, sha256_hex, weightsmith};

/// A safetensors file held as (dtype, shape, bytes) per tensor, to edit and write back.
#[derive(Clone)]
struct Tensors(BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>);

impl Tensors {
    fn read(path: &Path) -> Tensors {
        let bytes = std::fs::read(path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        Tensors(
            st.tensors()
                .into_iter()
                .map(|(name, v)| (name, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
                .collect(),
        )
    }

    fn write(&self, path: &Path) {
        let views: Vec<(String, TensorView<'_>)> = self
            .0
            .iter()
            .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn name_containing(&self, part: &str) -> String {
        self.0
            .keys()
            .find(|k| k.contains(part))
            .unwrap_or_else(|| panic!("no tensor containing {part}"))
            .clone()
    }

    /// Replaces a tensor with `rows × cols` (or a vector when `cols` is None) F32 values.
    fn set_f32(&mut self, name: &str, shape: &[usize]) {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| (0.01 * (i % 7) as f32).to_le_bytes())
            .collect();
        self.0
            .insert(name.to_string(), (Dtype::F32, shape.to_vec(), bytes));
    }
}

/// A copy of a fixture adapter in `tmp/name`, its tensors and config edited by `edit`.
fn adapter(
    tmp: &Path,
    fixture_adapter: &str,
    name: &str,
    edit: impl FnOnce(&mut Tensors, &mut Value),
) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture(fixture_adapter);
    let mut tensors = Tensors::read(&src.join("adapter_model.safetensors"));
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut tensors, &mut config);
    tensors.write(&dir.join("adapter_model.safetensors"));
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    dir
}

/// A copy of a fixture model in `tmp`, the shard holding `tensor` rewritten by `edit`.
fn base_with(
    tmp: &Path,
    fixture_model: &str,
    tensor: &str,
    edit: impl FnOnce(&mut (Dtype, Vec<usize>, Vec<u8>)),
) -> PathBuf {
    let dir = copy_fixture(fixture_model, tmp);
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap_or_else(|_| {
            format!(r#"{{"weight_map": {{"{tensor}": "model.safetensors"}}}}"#)
        }),
    )
    .unwrap();
    let shard = dir.join(index["weight_map"][tensor].as_str().unwrap());
    let mut tensors = Tensors::read(&shard);
    edit(tensors.0.get_mut(tensor).expect("tensor in its shard"));
    tensors.write(&shard);
    dir
}

/// Every file under `dir` with its hash, to show an input unchanged.
fn hashes(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), sha256_hex(&std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// Runs a merge that must be refused: exit ≠ 0, every needle in the message, no output, inputs
/// unchanged.
fn refused(tmp: &Path, base: &Path, adapters: &[&Path], extra: &[&str], needles: &[&str]) {
    let out = tmp.join("merged");
    let before: Vec<_> = std::iter::once(base)
        .chain(adapters.iter().copied())
        .map(hashes)
        .collect();
    let mut args: Vec<String> = vec!["merge".into(), "--base".into(), base.display().to_string()];
    for a in adapters {
        args.push("--adapter".into());
        args.push(a.display().to_string());
    }
    args.push("--out".into());
    args.push(out.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = weightsmith(&argv);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{argv:?} was accepted");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "no {n:?} in: {stderr}");
    }
    assert!(!out.exists(), "an output was left behind after: {stderr}");
    let leftovers: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("merged"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let after: Vec<_> = std::iter::once(base)
        .chain(adapters.iter().copied())
        .map(hashes)
        .collect();
    assert_eq!(before, after, "an input changed");
}

fn llama() -> PathBuf {
    fixture("models/tiny-llama")
}

#[test]
fn dora_with_another_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    refused(
        tmp.path(),
        &llama(),
        &[
            &fixture("adapters/llama-dora/adapter"),
            &fixture("adapters/llama-lora/adapter"),
        ],
        &[],
        &["DoRA adapters cannot be combined with other adapters"],
    );
}

#[test]
fn a_dtype_that_is_not_16_bit() {
    let tmp = tempfile::tempdir().unwrap();
    refused(
        tmp.path(),
        &llama(),
        &[&fixture("adapters/llama-lora/adapter")],
        &["--dtype", "f32"],
        &["--dtype", "bf16 or f16"],
    );
}

#[test]
fn an_exl2_base() {
    let tmp = tempfile::tempdir().unwrap();
    refused(
        tmp.path(),
        &fixture("quantized/tiny-llama-exl2"),
        &[&fixture("adapters/llama-lora/adapter")],
        &[],
        &[
            "is EXL2-quantised",
            "merging into an EXL2 model is not supported",
        ],
    );
}

#[test]
fn two_adapters_replacing_one_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let a = fixture("adapters/llama-embedding-mts/adapter");
    let b = adapter(
        tmp.path(),
        "adapters/llama-embedding-mts/adapter",
        "b",
        |_, _| {},
    );
    refused(
        tmp.path(),
        &llama(),
        &[&a, &b],
        &[],
        &["two adapters both replace", "merge them one at a time"],
    );
}

#[test]
fn a_replacement_of_another_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(
        tmp.path(),
        "adapters/llama-embedding-mts/adapter",
        "mts",
        |t, _| {
            let name = t.name_containing("lm_head.weight");
            // One column short (a vocabulary tensor may change its rows: resized
            // embeddings; never its width).
            let shape = t.0[&name].1.clone();
            t.set_f32(&name, &[shape[0], shape[1] - 1]);
        },
    );
    refused(
        tmp.path(),
        &llama(),
        &[&a],
        &[],
        &["mts", "replaces a base tensor of shape"],
    );
}

#[test]
fn a_base_weight_that_is_not_floating_point() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let base = base_with(
        tmp.path(),
        "models/tiny-llama",
        name,
        |(d, shape, bytes)| {
            // The same element count as 16-bit integers.
            *d = Dtype::I16;
            assert_eq!(bytes.len(), shape.iter().product::<usize>() * 2);
        },
    );
    refused(
        tmp.path(),
        &base,
        &[&fixture("adapters/llama-lora/adapter")],
        &[],
        &[name, "I16", "merging needs an F32, F16 or BF16 base weight"],
    );
}

#[test]
fn factors_that_do_not_fit_the_base_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(
        tmp.path(),
        "adapters/llama-lora/adapter",
        "bad-a",
        |t, _| {
            let name = t.name_containing("layers.1.self_attn.q_proj.lora_A");
            t.set_f32(&name, &[8, 32]);
        },
    );
    refused(
        tmp.path(),
        &llama(),
        &[&a],
        &[],
        &[
            "bad-a",
            "layers.1.self_attn.q_proj",
            "which need a base weight of shape",
        ],
    );
}

#[test]
fn transposed_in_one_adapter_and_not_in_another() {
    let tmp = tempfile::tempdir().unwrap();
    // Only c_proj (square, 64 × 64 in the tiny GPT-2): the two layouts agree on its shape, so
    // only the transposition tells them apart.
    let keep_c_proj = |t: &mut Tensors, c: &mut Value| {
        t.0.retain(|k, _| k.contains("attn.c_proj"));
        c["target_modules"] = serde_json::json!(["c_proj"]);
    };
    let a = adapter(
        tmp.path(),
        "adapters/gpt2-fan-in-fan-out/adapter",
        "fan-in-fan-out",
        keep_c_proj,
    );
    let b = adapter(
        tmp.path(),
        "adapters/gpt2-fan-in-fan-out/adapter",
        "not-transposed",
        |t, c| {
            keep_c_proj(t, c);
            c["fan_in_fan_out"] = Value::Bool(false);
        },
    );
    refused(
        tmp.path(),
        &fixture("models/tiny-gpt2"),
        &[&a, &b],
        &[],
        &[
            "c_proj",
            "stored transposed in one adapter and not in another",
        ],
    );
}

#[test]
fn a_dora_magnitude_of_the_wrong_length() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path(), "adapters/llama-dora/adapter", "dora", |t, _| {
        let name = t.name_containing("layers.0.mlp.down_proj.lora_magnitude_vector");
        t.set_f32(&name, &[63]);
    });
    refused(
        tmp.path(),
        &llama(),
        &[&a],
        &[],
        &[
            "layers.0.mlp.down_proj",
            "DoRA magnitude of 63 values for 64 output rows",
        ],
    );
}

#[test]
fn a_module_the_base_does_not_have() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(
        tmp.path(),
        "adapters/llama-lora/adapter",
        "other",
        |t, _| {
            let moved: Vec<_> =
                t.0.iter()
                    .filter(|(k, _)| k.contains("layers.2."))
                    .map(|(k, v)| (k.replace("layers.2.", "layers.9."), v.clone()))
                    .collect();
            t.0.extend(moved);
        },
    );
    refused(
        tmp.path(),
        &llama(),
        &[&a],
        &[],
        &["layers.9.", "which the base does not have"],
    );
}

#[test]
fn a_lora_bias_where_the_base_layer_has_none() {
    let tmp = tempfile::tempdir().unwrap();
    // Llama's projections have no bias; an adapter trained with lora_bias=True on another
    // model's layout says it has.
    let a = adapter(tmp.path(), "adapters/llama-lora/adapter", "bias", |t, c| {
        let name = t.name_containing("layers.0.self_attn.q_proj.lora_B.weight");
        t.set_f32(&name.replace(".weight", ".bias"), &[64]);
        c["lora_bias"] = Value::Bool(true);
    });
    refused(
        tmp.path(),
        &llama(),
        &[&a],
        &[],
        &[
            "layers.0.self_attn.q_proj",
            "has a LoRA bias but the base layer has no bias",
        ],
    );
}

#[test]
fn a_lora_bias_of_the_wrong_length() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(
        tmp.path(),
        "adapters/qwen2-tied-bias/adapter",
        "bias",
        |t, _| {
            let name = t.name_containing("layers.0.self_attn.k_proj.lora_B.bias");
            t.set_f32(&name, &[15]);
        },
    );
    refused(
        tmp.path(),
        &fixture("models/tiny-qwen2"),
        &[&a],
        &[],
        &["layers.0.self_attn.k_proj", "but its LoRA bias"],
    );
}

#[test]
fn a_lora_bias_on_an_integer_base_bias() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "model.layers.0.self_attn.k_proj.bias";
    let base = base_with(
        tmp.path(),
        "models/tiny-qwen2",
        name,
        |(d, shape, bytes)| {
            // An integer type of the same width.
            let n: usize = shape.iter().product();
            *d = if bytes.len() == n * 4 {
                Dtype::I32
            } else {
                Dtype::I16
            };
        },
    );
    refused(
        tmp.path(),
        &base,
        &[&fixture("adapters/qwen2-tied-bias/adapter")],
        &[],
        &[name, "has LoRA bias terms but dtype I"],
    );
}

#[test]
fn an_existing_output_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("taken");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), b"a user's file").unwrap();
    let o = weightsmith(&[
        "merge",
        "--base",
        llama().to_str().unwrap(),
        "--adapter",
        fixture("adapters/llama-lora/adapter").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains(out.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    assert!(stderr.contains("--force replaces it"), "{stderr}");
    assert_eq!(
        std::fs::read(out.join("mine.txt")).unwrap(),
        b"a user's file"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}
