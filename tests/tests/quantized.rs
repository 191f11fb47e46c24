//! Quantised checkpoints: those of fixtures/quantized made by scripts/fixtures/make_quant_fixtures.py
//! (the project's numpy packer, for shapes and failure cases) and those GPTQModel itself made
//! and dequantised (scripts/fixtures/make_gptqmodel_fixtures.py: the reference no one here
//! wrote). GPTQ and EXL2 layers recognised with their bits, dimensions and tensors; GPTQ
//! dequantisation equal to GPTQModel's own element for element; malformed layers refused with
//! the tensor named.

use std::collections::BTreeMap;
use std::path::Path;

use st_io::{Checkpoint, QuantScheme};
use weightsmith::lora_kernels::dequant::GptqLayer;
use weightsmith_tests::fixture;

const GPTQ: &[(&str, u32, u64, bool, u32)] = &[
    // name, bits, group size, act-order, zero offset
    ("tiny-llama-gptq-4bit", 4, 32, false, 1),
    ("tiny-llama-gptq-3bit-actorder", 3, 32, true, 1),
    ("tiny-llama-gptq-8bit", 8, 64, false, 1),
    ("tiny-llama-gptq-2bit-v2", 2, 128, false, 0),
];

fn f32_tensors(path: &Path) -> BTreeMap<String, Vec<u32>> {
    let c = Checkpoint::open(path).unwrap();
    c.tensors()
        .iter()
        .map(|t| {
            let bits = c
                .tensor_bytes(t)
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (t.name.clone(), bits)
        })
        .collect()
}

#[test]
fn gptq_layers_are_recognised_with_their_parameters() {
    for &(name, bits, group, act_order, offset) in GPTQ {
        let c = Checkpoint::open(fixture(&format!("quantized/{name}"))).unwrap();
        let linears = st_io::quant::quantized_linears(&c).unwrap();
        assert_eq!(linears.len(), 21, "{name}");
        let down = linears
            .iter()
            .find(|l| l.module == "model.layers.1.mlp.down_proj")
            .unwrap();
        assert_eq!((down.in_features, down.out_features), (128, 64), "{name}");
        let QuantScheme::Gptq(p) = &down.scheme else {
            panic!("{name}: not GPTQ")
        };
        assert_eq!(
            (p.bits, p.group_size, p.act_order, p.zero_offset),
            (bits, group, act_order, offset),
            "{name}"
        );
        assert_eq!(down.weight_bits, bits as f64);
        // Codes, plus a 16-bit scale and a packed zero per group and output, plus g_idx.
        let groups = 128u64.div_ceil(group);
        let stored = 128 * 64 * bits as u64 + groups * 64 * (16 + bits as u64) + 128 * 32;
        assert!(
            (down.bits_per_weight - stored as f64 / (128.0 * 64.0)).abs() < 1e-9,
            "{name}: {}",
            down.bits_per_weight
        );
        assert_eq!(down.parts.len(), 4, "{name}: {:?}", down.parts);
    }
}

#[test]
fn gptq_dequantisation_equals_the_reference_bit_for_bit() {
    for &(name, ..) in GPTQ {
        let c = Checkpoint::open(fixture(&format!("quantized/{name}"))).unwrap();
        let reference = f32_tensors(&fixture(&format!(
            "quantized/references/{name}.dequant.safetensors"
        )));
        let linears = st_io::quant::quantized_linears(&c).unwrap();
        assert_eq!(linears.len(), reference.len());
        for l in &linears {
            let ours = GptqLayer::from_checkpoint(&c, l).unwrap().to_f32().unwrap();
            let want = &reference[&format!("{}.weight", l.module)];
            let ours: Vec<u32> = ours.iter().map(|v| v.to_bits()).collect();
            assert_eq!(&ours, want, "{name}: {}", l.module);
        }
    }
}

#[test]
fn exl2_layers_are_recognised_with_their_mixed_bits() {
    let c = Checkpoint::open(fixture("quantized/tiny-llama-exl2")).unwrap();
    let linears = st_io::quant::quantized_linears(&c).unwrap();
    assert_eq!(linears.len(), 21);
    let gate = linears
        .iter()
        .find(|l| l.module == "model.layers.2.mlp.gate_proj")
        .unwrap();
    assert_eq!((gate.in_features, gate.out_features), (64, 128));
    let QuantScheme::Exl2 { groups } = &gate.scheme else {
        panic!("not EXL2")
    };
    // 64 inputs in two groups of 32 rows: 6 bits, then 4.
    assert_eq!(
        groups.iter().map(|g| (g.bits, g.rows)).collect::<Vec<_>>(),
        [(6, 32), (4, 32)]
    );
    assert_eq!(gate.weight_bits, 5.0);
    assert!(gate.bits_per_weight > 5.0 && gate.bits_per_weight < 6.0);
    assert!(gate.part("q_invperm").is_some() && gate.part("q_perm").is_some());
}

/// Rewrites one tensor of a copy of a fixture (same dtype and size) and returns the folder.
fn with_tensor(
    name: &str,
    tensor: &str,
    edit: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>),
) -> tempfile::TempDir {
    let src = fixture(&format!("quantized/{name}"));
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    let entry = header[tensor].clone();
    let (s, e) = (
        entry["data_offsets"][0].as_u64().unwrap() as usize,
        entry["data_offsets"][1].as_u64().unwrap() as usize,
    );
    let mut body = data[s..e].to_vec();
    edit(&mut header[tensor], &mut body);
    assert_eq!(body.len(), e - s, "edits keep the size");
    data[s..e].copy_from_slice(&body);
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(&file, out).unwrap();
    dir
}

#[test]
fn malformed_gptq_layers_are_refused_naming_the_tensor() {
    // A qzeros whose width is no GPTQ packing of the outputs.
    let dir = with_tensor(
        "tiny-llama-gptq-4bit",
        "model.layers.0.self_attn.q_proj.qzeros",
        |h, _| h["shape"] = serde_json::json!([16, 1]),
    );
    let c = Checkpoint::open(dir.path()).unwrap();
    let e = st_io::quant::quantized_linears(&c).unwrap_err().to_string();
    assert!(
        e.contains("\"model.layers.0.self_attn.q_proj.qzeros\"")
            && e.contains("no GPTQ packing")
            && e.contains("model.safetensors"),
        "{e}"
    );
    // A group index past the last group: found when the layer is read.
    let dir = with_tensor(
        "tiny-llama-gptq-4bit",
        "model.layers.2.mlp.up_proj.g_idx",
        |_, body| body[40..44].copy_from_slice(&7i32.to_le_bytes()),
    );
    let c = Checkpoint::open(dir.path()).unwrap();
    let linears = st_io::quant::quantized_linears(&c).unwrap();
    let up = linears
        .iter()
        .find(|l| l.module == "model.layers.2.mlp.up_proj")
        .unwrap();
    let e = GptqLayer::from_checkpoint(&c, up).unwrap_err().to_string();
    assert!(
        e.contains("\"model.layers.2.mlp.up_proj.g_idx\"")
            && e.contains("input row 10 group 7")
            && e.contains("2 groups"),
        "{e}"
    );
    // Bits in config.json that the tensors contradict.
    let dir = with_tensor("tiny-llama-gptq-4bit", "model.norm.weight", |_, _| {});
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"bits\": 4", "\"bits\": 8");
    std::fs::write(&cfg, text).unwrap();
    let c = Checkpoint::open(dir.path()).unwrap();
    let e = st_io::quant::quantized_linears(&c).unwrap_err().to_string();
    assert!(
        e.contains("packs 4-bit zero points but config.json's quantization_config.bits is 8"),
        "{e}"
    );
}

#[test]
fn malformed_exl2_layers_are_refused_naming_the_tensor() {
    // q_groups claiming 8-bit rows: the group rows no longer add up to the permutation.
    let dir = with_tensor(
        "tiny-llama-exl2",
        "model.layers.0.mlp.down_proj.q_groups",
        |_, body| body[0..2].copy_from_slice(&8i16.to_le_bytes()),
    );
    let c = Checkpoint::open(dir.path()).unwrap();
    let e = st_io::quant::quantized_linears(&c).unwrap_err().to_string();
    assert!(
        e.contains("\"model.layers.0.mlp.down_proj.q_groups\"") && e.contains("input rows"),
        "{e}"
    );
}

fn merge_into(name: &str, out: &Path) -> weightsmith::Result<weightsmith::MergeReport> {
    let mut options =
        weightsmith::MergeOptions::new(vec![(fixture("adapters/llama-lora/adapter"), 1.0)], out);
    options.device = weightsmith::MergeDevice::Cpu;
    options.verify = true;
    weightsmith::merge(fixture(&format!("quantized/{name}")), &options, &mut |_| {})
}

#[test]
fn a_lora_merged_into_gptq_is_within_one_ulp_of_dequantise_then_merge_in_f32() {
    for &(name, ..) in GPTQ {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged");
        let report = merge_into(name, &out).unwrap();
        assert_eq!(report.dtype, "F16", "{name}");
        let verify = report.verify.unwrap();
        assert!(verify.max_ulps <= 1, "{name}: verify {}", verify.max_ulps);
        assert_eq!(report.modules.len(), 21, "{name}");
        let merged = Checkpoint::open(&out).unwrap();
        let reference = Checkpoint::open(fixture(&format!(
            "quantized/references/{name}.merged-llama-lora.safetensors"
        )))
        .unwrap();
        let mut worst = 0;
        for r in reference.tensors() {
            let t = merged
                .tensor(&r.name)
                .unwrap_or_else(|| panic!("{name}: no {}", r.name));
            assert_eq!(
                (t.dtype, &t.shape),
                (r.dtype, &r.shape),
                "{name}: {}",
                r.name
            );
            let (a, b) = (merged.tensor_bytes(t), reference.tensor_bytes(r));
            for (x, y) in a.chunks_exact(2).zip(b.chunks_exact(2)) {
                let d = weightsmith::lora_kernels::ulp_distance(
                    u16::from_le_bytes([x[0], x[1]]),
                    u16::from_le_bytes([y[0], y[1]]),
                );
                worst = worst.max(d);
            }
        }
        assert!(worst <= 1, "{name}: {worst} ulps from the reference");
        // A plain 16-bit checkpoint: no quantised tensors, no quantization_config.
        assert!(merged
            .tensors()
            .iter()
            .all(|t| !t.name.ends_with(".qweight")
                && !t.name.ends_with(".qzeros")
                && !t.name.ends_with(".scales")
                && !t.name.ends_with(".g_idx")));
        assert!(merged
            .tensors()
            .iter()
            .all(|t| t.dtype == st_io::Dtype::F16));
        let config = merged.config().unwrap();
        assert!(config.quantization.is_none(), "{name}");
        assert!(st_io::quant::quantized_linears(&merged).unwrap().is_empty());
        assert_eq!(merged.tensors().len(), 3 * 9 + 3, "{name}");
    }
}

#[test]
fn merging_into_exl2_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let e = merge_into("tiny-llama-exl2", &out).unwrap_err().to_string();
    assert!(
        e.contains("is EXL2-quantised")
            && e.contains("merge the adapter into the 16-bit base model")
            && e.contains("tiny-llama-exl2"),
        "{e}"
    );
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// With a GPU (scripts/gpu-check.sh): the CUDA dequantiser gives the CPU's bits on every GPTQ
/// fixture, and a merge into GPTQ on the GPU writes the CPU merge's bytes. Without one this
/// says so and checks nothing more.
#[test]
fn gptq_on_the_gpu_equals_the_cpu_bit_for_bit() {
    if !weightsmith_tests::gpu_available() {
        return;
    }
    let merger = weightsmith::lora_kernels::gpu::GpuMerger::new(0).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for &(name, ..) in GPTQ {
        let c = Checkpoint::open(fixture(&format!("quantized/{name}"))).unwrap();
        for l in st_io::quant::quantized_linears(&c).unwrap() {
            let layer = GptqLayer::from_checkpoint(&c, &l).unwrap();
            let cpu: Vec<u32> = layer
                .to_f32()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let gpu: Vec<u32> = merger
                .dequantize_gptq(&layer)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert!(
                cpu == gpu,
                "{name}: {} differs between CPU and GPU",
                l.module
            );
        }
        let mut outputs = Vec::new();
        for device in [
            weightsmith::MergeDevice::Cpu,
            weightsmith::MergeDevice::Cuda(0),
        ] {
            let out = tmp.path().join(format!("{name}-{device:?}"));
            let mut options = weightsmith::MergeOptions::new(
                vec![(fixture("adapters/llama-lora/adapter"), 1.0)],
                &out,
            );
            options.device = device;
            weightsmith::merge(fixture(&format!("quantized/{name}")), &options, &mut |_| {})
                .unwrap();
            outputs.push(Checkpoint::open(&out).unwrap());
        }
        for t in outputs[0].tensors() {
            let g = outputs[1].tensor(&t.name).unwrap();
            assert!(
                outputs[0].tensor_bytes(t) == outputs[1].tensor_bytes(g),
                "{name}: {} differs between the CPU and GPU merges",
                t.name
            );
        }
    }
}

#[test]
fn quantised_checkpoints_plan_with_their_real_bytes_and_load_as_stored() {
    for name in [
        "tiny-llama-gptq-4bit",
        "tiny-llama-gptq-3bit-actorder",
        "tiny-llama-exl2",
    ] {
        let path = fixture(&format!("quantized/{name}"));
        let c = Checkpoint::open(&path).unwrap();
        // The plan places the stored bytes (codes, scales, zeros, indices), not a 16-bit size.
        let plan_options = weightsmith::PlanOptions {
            devices: weightsmith::plan::DeviceChoice::Simulated(vec![1 << 30, 1 << 30]),
            ..Default::default()
        };
        let plan = weightsmith::plan_checkpoint(&path, &plan_options).unwrap();
        let planned: u64 = plan.plan.units.iter().map(|u| u.weight_bytes).sum();
        assert_eq!(planned, c.total_tensor_bytes(), "{name}");
        let options = weightsmith::LoadOptions {
            verify: true,
            ..Default::default()
        };
        let loaded = weightsmith::load(&path, &options, &mut |_| {}).unwrap();
        assert_eq!(loaded.report.verified_tensors, Some(c.tensors().len()));
        assert_eq!(loaded.quantized.len(), 21, "{name}");
        let linears = st_io::quant::quantized_linears(&c).unwrap();
        for (q, l) in loaded.quantized.iter().zip(&linears) {
            assert_eq!(q.module, l.module);
            assert_eq!(
                (q.in_features, q.out_features),
                (l.in_features, l.out_features)
            );
            assert_eq!(q.scheme, l.scheme);
            assert_eq!(q.parts.len(), l.parts.len(), "{name}: {}", q.module);
            for (role, &i) in &l.parts {
                let t = &c.tensors()[i];
                let part = loaded.quantized_part(q, role).unwrap();
                assert_eq!(part.name, t.name);
                assert_eq!(
                    part.device, q.device,
                    "{name}: a layer's parts share a device"
                );
                assert_eq!(part.buffer.read_back().unwrap(), c.tensor_bytes(t));
            }
        }
        let first = loaded
            .quantized_linear("model.layers.0.self_attn.q_proj")
            .unwrap();
        let roles: Vec<&str> = first.parts.keys().map(String::as_str).collect();
        if name.contains("exl2") {
            assert!(roles.contains(&"q_invperm") && roles.contains(&"q_groups"));
        } else {
            assert_eq!(roles, ["g_idx", "qweight", "qzeros", "scales"]);
        }
    }
}

#[test]
fn the_cli_merges_into_gptq_and_refuses_exl2_with_exit_code_one() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixture("adapters/llama-lora/adapter");
    let run = |base: &str, out: &str| {
        weightsmith_tests::weightsmith(&[
            "merge",
            "--base",
            fixture(&format!("quantized/{base}")).to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            dir.path().join(out).to_str().unwrap(),
            "--device",
            "cpu",
        ])
    };
    let ok = run("tiny-llama-gptq-3bit-actorder", "gptq");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let inspect =
        weightsmith_tests::weightsmith(&["inspect", dir.path().join("gptq").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        !text.contains("quantised") && text.contains("F16"),
        "{text}"
    );
    let refused = run("tiny-llama-exl2", "exl2");
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("EXL2-quantised"), "{stderr}");
    assert!(!dir.path().join("exl2").exists());
}

/// Renames one tensor of a copy of a fixture (the header only; the data stays).
fn with_renamed(name: &str, from: &str, to: &str) -> tempfile::TempDir {
    let dir = with_tensor(name, from, |_, _| {});
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let entry = header.as_object_mut().unwrap().remove(from).unwrap();
    header[to] = entry;
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(&file, out).unwrap();
    dir
}

#[test]
fn incomplete_or_ambiguous_quantised_layers_and_awq_merges_are_refused() {
    // A GPTQ layer without its zero points.
    let dir = with_renamed(
        "tiny-llama-gptq-4bit",
        "model.layers.1.mlp.up_proj.qzeros",
        "model.layers.1.mlp.up_proj.qzerox",
    );
    let c = Checkpoint::open(dir.path()).unwrap();
    let e = st_io::quant::quantized_linears(&c).unwrap_err().to_string();
    assert!(
        e.contains("\"model.layers.1.mlp.up_proj.qweight\" is a quantised weight but \"model.layers.1.mlp.up_proj.qzeros\" is missing"),
        "{e}"
    );
    // A plain weight stored beside the quantised one.
    let dir = with_renamed(
        "tiny-llama-gptq-4bit",
        "model.layers.1.mlp.up_proj.g_idx",
        "model.layers.1.mlp.up_proj.weight",
    );
    let c = Checkpoint::open(dir.path()).unwrap();
    let e = st_io::quant::quantized_linears(&c).unwrap_err().to_string();
    assert!(
        e.contains("\"model.layers.1.mlp.up_proj.weight\" is stored too"),
        "{e}"
    );
    // The same tensors declared AWQ: recognised, and a merge into them refused.
    let dir = with_tensor("tiny-llama-gptq-4bit", "model.norm.weight", |_, _| {});
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"quant_method\": \"gptq\"", "\"quant_method\": \"awq\"");
    std::fs::write(&cfg, text).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let out = elsewhere.path().join("merged");
    let mut options =
        weightsmith::MergeOptions::new(vec![(fixture("adapters/llama-lora/adapter"), 1.0)], &out);
    options.device = weightsmith::MergeDevice::Cpu;
    let e = weightsmith::merge(dir.path(), &options, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is AWQ-quantised") && e.contains("not supported"),
        "{e}"
    );
    assert!(!out.exists());
}

/// Checkpoints quantised by GPTQModel itself (scripts/fixtures/make_gptqmodel_fixtures.py),
/// with (bits, group size, act-order).
const GPTQMODEL: &[(&str, u32, u64, bool)] = &[
    ("tiny-llama-gptqmodel-4bit", 4, 32, false),
    ("tiny-llama-gptqmodel-3bit-actorder", 3, 32, true),
    ("tiny-llama-gptqmodel-8bit", 8, 64, false),
];

/// Against a GPTQ implementation no one here wrote: GPTQModel's own dequantisation of the
/// files GPTQModel wrote (`scales[g_idx] * (codes - zeros[g_idx])` in float16) equals ours
/// rounded to float16, element for element. Ours is the exact product in f32 (a code
/// difference of at most 8 bits times an 11-bit significand), so rounding it once is what
/// float16 arithmetic does.
#[test]
fn gptq_dequantisation_equals_gptqmodels_own_element_for_element() {
    for &(name, bits, group, act_order) in GPTQMODEL {
        let c = Checkpoint::open(fixture(&format!("quantized/{name}"))).unwrap();
        let reference = Checkpoint::open(fixture(&format!(
            "quantized/references/{name}.dequant.safetensors"
        )))
        .unwrap();
        let linears = st_io::quant::quantized_linears(&c).unwrap();
        assert_eq!(linears.len(), 21, "{name}");
        for l in &linears {
            let QuantScheme::Gptq(p) = &l.scheme else {
                panic!("{name}: {} is not GPTQ", l.module)
            };
            assert_eq!(
                (p.bits, p.group_size, p.act_order),
                (bits, group, act_order),
                "{name}"
            );
            let want = reference
                .tensor(&format!("{}.weight", l.module))
                .unwrap_or_else(|| panic!("{name}: no reference for {}", l.module));
            assert_eq!(
                want.shape,
                [l.out_features, l.in_features],
                "{name}: {}",
                l.module
            );
            let want: Vec<u16> = reference
                .tensor_bytes(want)
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            let ours: Vec<u16> = GptqLayer::from_checkpoint(&c, l)
                .unwrap()
                .to_f32()
                .unwrap()
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let differ = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                differ,
                0,
                "{name}: {} differs in {differ} of {} values",
                l.module,
                want.len()
            );
        }
    }
}

/// A real GPTQ checkpoint is a complete model of its architecture: no layout problem.
#[test]
fn quantised_checkpoints_have_no_layout_problems() {
    let names = GPTQ
        .iter()
        .map(|g| g.0)
        .chain(GPTQMODEL.iter().map(|g| g.0))
        .chain(["tiny-llama-exl2"]);
    for name in names {
        let out = weightsmith_tests::weightsmith(&[
            "inspect",
            fixture(&format!("quantized/{name}")).to_str().unwrap(),
            "--json",
        ]);
        assert!(out.status.success(), "{name}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["problems"], serde_json::json!([]), "{name}");
    }
}
