//! Quantised linear layers: the tensor groups of GPTQ, EXL2 and AWQ checkpoints, recognised by
//! name, checked against each other and against `config.json`.
//!
//! # GPTQ (AutoGPTQ / GPTQModel / transformers `GPTQConfig` checkpoints)
//! For a linear layer `M` with `in` inputs and `out` outputs, `b` bits (2, 3, 4 or 8) and `G`
//! groups (`group_size` input rows each, `-1` = one group):
//! - `M.qweight` I32 `[in·b/32, out]`: each column holds the `b`-bit codes of its `in` weights,
//!   32 input rows per block of `b` consecutive words, as a little-endian bit stream (code `k`
//!   of a block at bits `k·b .. k·b+b`; for 3 bits a code can straddle two words). This is the
//!   packing of AutoGPTQ's `QuantLinear.pack` (`qlinear_cuda_old.py`), which GPTQModel and
//!   transformers' GPTQ integration read and write.
//! - `M.qzeros` I32 `[G, out·b/32]`: the zero points, packed the same way along the outputs.
//!   `checkpoint_format: "gptq"` (the default, AutoGPTQ's "v1") stores `zero − 1`;
//!   `"gptq_v2"` (GPTQModel) stores `zero`.
//! - `M.scales` F16 (some tools write F32 or BF16) `[G, out]`.
//! - `M.g_idx` I32 `[in]`: the group of each input row; `row / group_size` without act-order,
//!   a permuted assignment with it (`desc_act: true`). Optional (then `row / group_size`).
//! - `M.bias` `[out]`, optional.
//!
//! The weight is `W[o][i] = scales[g][o] · (q[i][o] − z[g][o])` with `g = g_idx[i]` and
//! `z` the stored zero plus the offset (1 in v1). Bits are read from the shapes (`qzeros` has
//! `out·b/32` columns) and checked against `quantization_config.bits`.
//!
//! # EXL2 (exllamav2)
//! `M.q_weight` I32 `[rows, out]` (rows of mixed bit widths), `M.q_scale` I32 `[G, out/8]`
//! (4-bit scales), `M.q_scale_max` F16 `[G]`, `M.q_groups` I16 `[2G]` (bits and first packed
//! row of each group), `M.q_invperm` (and optionally `M.q_perm`) `[in]`, optionally
//! `M.q_group_map` and `M.bias`. `in` is the permutation's length; each group's input rows are
//! `packed rows · 32 / bits`. Merging into EXL2 is not supported (see the merge verb).
//!
//! # AWQ
//! `M.qweight` I32 `[in, out·b/32]` (packed along the outputs, interleaved), `M.qzeros`,
//! `M.scales`: recognised and sized so that inspect, plan and load handle it; not dequantised.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::config::{QuantKind, QuantizationConfig};
use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// GPTQ parameters of one linear layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GptqParams {
    /// 2, 3, 4 or 8.
    pub bits: u32,
    /// Input rows per group (the layer's `in` for `group_size: -1`).
    pub group_size: u64,
    pub groups: u64,
    /// `desc_act` (act-order): groups come from `g_idx` in a permuted order.
    pub act_order: bool,
    pub sym: Option<bool>,
    /// Added to the stored zero points: 1 for `checkpoint_format: "gptq"`, 0 for `"gptq_v2"`.
    pub zero_offset: u32,
}

/// One group of rows of an EXL2 layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Exl2Group {
    pub bits: u32,
    /// Input rows in the group.
    pub rows: u64,
}

/// How a linear layer is quantised.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "format")]
pub enum QuantScheme {
    Gptq(GptqParams),
    Exl2 { groups: Vec<Exl2Group> },
    Awq { bits: u32 },
}

impl QuantScheme {
    pub fn format(&self) -> &'static str {
        match self {
            QuantScheme::Gptq(_) => "gptq",
            QuantScheme::Exl2 { .. } => "exl2",
            QuantScheme::Awq { .. } => "awq",
        }
    }
}

/// A quantised linear layer: its module path, its dimensions and its tensors.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantizedLinear {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub in_features: u64,
    pub out_features: u64,
    pub scheme: QuantScheme,
    /// The layer's tensors by role (`qweight`, `qzeros`, `scales`, `g_idx`, `bias`, or the
    /// EXL2 names), as indices into [`Checkpoint::tensors`].
    pub parts: BTreeMap<String, usize>,
    /// Bits of the codes per weight (EXL2: the row-weighted mean over its groups).
    pub weight_bits: f64,
    /// Every stored bit of the layer but its bias, per weight: codes, scales, zeros, indices.
    pub bits_per_weight: f64,
}

impl QuantizedLinear {
    /// The checkpoint index of the tensor with this role.
    pub fn part(&self, role: &str) -> Option<usize> {
        self.parts.get(role).copied()
    }
}

const GPTQ_ROLES: &[&str] = &["qweight", "qzeros", "scales", "g_idx", "bias"];
/// The tensors of a quantised linear layer, per format (GPTQ and AWQ, then EXL2).
pub(crate) const ROLES: [&[&str]; 2] = [GPTQ_ROLES, EXL2_ROLES];
const EXL2_ROLES: &[&str] = &[
    "q_weight",
    "q_scale",
    "q_scale_max",
    "q_groups",
    "q_perm",
    "q_invperm",
    "q_group_map",
    "bias",
];

/// Finds and checks every quantised linear layer of a checkpoint, in tensor order. A layer
/// whose tensors disagree with each other or with `config.json` is an error naming the tensor.
pub fn quantized_linears(c: &Checkpoint) -> Result<Vec<QuantizedLinear>> {
    let config = c.config().and_then(|c| c.quantization.as_ref());
    let mut found = Vec::new();
    for t in c.tensors() {
        if let Some(module) = t.name.strip_suffix(".qweight") {
            let awq = matches!(config.map(|q| &q.kind), Some(QuantKind::Awq));
            found.push(if awq {
                awq_linear(c, module, t, config)?
            } else {
                gptq_linear(c, module, t, config)?
            });
        } else if let Some(module) = t.name.strip_suffix(".q_weight") {
            found.push(exl2_linear(c, module, t)?);
        }
    }
    Ok(found)
}

fn file_of<'a>(c: &'a Checkpoint, t: &TensorInfo) -> &'a Path {
    &c.files()[t.file].path
}

fn bad(c: &Checkpoint, t: &TensorInfo, message: String) -> Error {
    Error::BadQuantizedTensor {
        file: file_of(c, t).to_path_buf(),
        tensor: t.name.clone(),
        message,
    }
}

/// The tensors of `module` with the given roles; `required` roles must be present.
fn collect_parts(
    c: &Checkpoint,
    module: &str,
    roles: &[&str],
    required: &[&str],
    anchor: &TensorInfo,
) -> Result<BTreeMap<String, usize>> {
    let mut parts = BTreeMap::new();
    for role in roles {
        let name = format!("{module}.{role}");
        if let Some(i) = c.tensor_index(&name) {
            parts.insert(role.to_string(), i);
        } else if required.contains(role) {
            return Err(bad(
                c,
                anchor,
                format!("is a quantised weight but \"{name}\" is missing"),
            ));
        }
    }
    let plain = format!("{module}.weight");
    if c.tensor(&plain).is_some() {
        return Err(bad(
            c,
            anchor,
            format!("is a quantised weight but \"{plain}\" is stored too: which one is the layer?"),
        ));
    }
    Ok(parts)
}

fn expect(
    c: &Checkpoint,
    t: &TensorInfo,
    dtypes: &[Dtype],
    shape: Option<&[u64]>,
    what: &str,
) -> Result<()> {
    if !dtypes.contains(&t.dtype) {
        let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
        return Err(bad(
            c,
            t,
            format!("has dtype {} but {what} is {}", t.dtype, names.join(" or ")),
        ));
    }
    if let Some(s) = shape {
        if t.shape != s {
            return Err(bad(
                c,
                t,
                format!("has shape {:?} but {what} needs {s:?}", t.shape),
            ));
        }
    }
    Ok(())
}

fn two_d(c: &Checkpoint, t: &TensorInfo) -> Result<(u64, u64)> {
    match t.shape.as_slice() {
        [a, b] => Ok((*a, *b)),
        s => Err(bad(
            c,
            t,
            format!("has shape {s:?}; expected two dimensions"),
        )),
    }
}

fn stored_bits(c: &Checkpoint, parts: &BTreeMap<String, usize>, skip: &[&str]) -> u64 {
    parts
        .iter()
        .filter(|(role, _)| !skip.contains(&role.as_str()))
        .map(|(_, &i)| c.tensors()[i].len * 8)
        .sum()
}

fn gptq_linear(
    c: &Checkpoint,
    module: &str,
    anchor: &TensorInfo,
    config: Option<&QuantizationConfig>,
) -> Result<QuantizedLinear> {
    let parts = collect_parts(
        c,
        module,
        GPTQ_ROLES,
        &["qweight", "qzeros", "scales"],
        anchor,
    )?;
    let t = |role: &str| parts.get(role).map(|&i| &c.tensors()[i]);
    let (qweight, qzeros, scales) = (
        anchor,
        &c.tensors()[parts["qzeros"]],
        &c.tensors()[parts["scales"]],
    );
    expect(
        c,
        qweight,
        &[Dtype::I32, Dtype::U32],
        None,
        "a GPTQ qweight",
    )?;
    expect(c, qzeros, &[Dtype::I32, Dtype::U32], None, "a GPTQ qzeros")?;
    let (packed_rows, out) = two_d(c, qweight)?;
    let (groups, zero_cols) = two_d(c, qzeros)?;
    if out == 0 || groups == 0 {
        return Err(bad(c, qweight, "has no outputs or no groups".into()));
    }
    // Bits from the shapes: the zero points of `out` columns fill `zero_cols` words.
    let bits = (zero_cols * 32 / out) as u32;
    if zero_cols * 32 != out * bits as u64
        || ![2, 3, 4, 8].contains(&bits)
        || zero_cols % bits as u64 != 0
    {
        return Err(bad(
            c,
            qzeros,
            format!("has {zero_cols} columns for {out} outputs, which is no GPTQ packing of 2, 3, 4 or 8 bits"),
        ));
    }
    let dynamic = config.is_some_and(|q| q.dynamic);
    if let Some(b) = config.and_then(|q| q.bits) {
        if b != bits as f64 && !dynamic {
            return Err(bad(
                c,
                qzeros,
                format!("packs {bits}-bit zero points but config.json's quantization_config.bits is {b}"),
            ));
        }
    }
    if packed_rows == 0 || packed_rows % bits as u64 != 0 {
        return Err(bad(
            c,
            qweight,
            format!("has {packed_rows} packed rows, not a whole number of blocks of 32 {bits}-bit codes"),
        ));
    }
    let inp = packed_rows * 32 / bits as u64;
    expect(
        c,
        scales,
        &[Dtype::F16, Dtype::BF16, Dtype::F32],
        Some(&[groups, out]),
        "the scales of this layer",
    )?;
    if let Some(g) = t("g_idx") {
        expect(
            c,
            g,
            &[Dtype::I32, Dtype::I64],
            Some(&[inp]),
            "the group index of this layer",
        )?;
    }
    if let Some(b) = t("bias") {
        expect_len(c, b, out, "outputs")?;
    }
    let configured = config.and_then(|q| q.group_size).filter(|_| !dynamic);
    let group_size = match configured {
        Some(g) if g > 0 => g as u64,
        Some(_) => inp,
        None => inp.div_ceil(groups),
    };
    if inp.div_ceil(group_size.max(1)) != groups {
        return Err(bad(
            c,
            scales,
            format!(
                "has {groups} groups but {inp} input rows in groups of {group_size} make {}",
                inp.div_ceil(group_size.max(1))
            ),
        ));
    }
    let zero_offset = match config.and_then(|q| q.checkpoint_format.as_deref()) {
        Some("gptq_v2") => 0,
        _ => 1,
    };
    let weights = (inp * out) as f64;
    Ok(QuantizedLinear {
        module: module.to_string(),
        in_features: inp,
        out_features: out,
        scheme: QuantScheme::Gptq(GptqParams {
            bits,
            group_size,
            groups,
            act_order: config.and_then(|q| q.desc_act).unwrap_or(false),
            sym: config.and_then(|q| q.sym),
            zero_offset,
        }),
        weight_bits: bits as f64,
        bits_per_weight: stored_bits(c, &parts, &["bias"]) as f64 / weights,
        parts,
    })
}

fn awq_linear(
    c: &Checkpoint,
    module: &str,
    anchor: &TensorInfo,
    config: Option<&QuantizationConfig>,
) -> Result<QuantizedLinear> {
    let parts = collect_parts(
        c,
        module,
        GPTQ_ROLES,
        &["qweight", "qzeros", "scales"],
        anchor,
    )?;
    let scales = &c.tensors()[parts["scales"]];
    let (inp, _) = two_d(c, anchor)?;
    let (_, out) = two_d(c, scales)?;
    let bits = config.and_then(|q| q.bits).unwrap_or(4.0) as u32;
    if inp == 0 || out == 0 {
        return Err(bad(c, anchor, "has no inputs or no outputs".into()));
    }
    let weights = (inp * out) as f64;
    Ok(QuantizedLinear {
        module: module.to_string(),
        in_features: inp,
        out_features: out,
        scheme: QuantScheme::Awq { bits },
        weight_bits: bits as f64,
        bits_per_weight: stored_bits(c, &parts, &["bias"]) as f64 / weights,
        parts,
    })
}

/// The values of an integer index tensor (I16, I32 or I64: `q_groups`, `g_idx`, permutations).
pub fn integer_values(c: &Checkpoint, t: &TensorInfo) -> Result<Vec<i64>> {
    let bytes = c.tensor_bytes(t);
    Ok(match t.dtype {
        Dtype::I16 => bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]) as i64)
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
            .collect(),
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect(),
        other => {
            return Err(bad(
                c,
                t,
                format!("has dtype {other}; expected I16, I32 or I64"),
            ))
        }
    })
}

/// A one-dimensional tensor of `n` values (a bias, a permutation).
fn expect_len(c: &Checkpoint, t: &TensorInfo, n: u64, what: &str) -> Result<()> {
    if t.shape != [n] {
        return Err(bad(
            c,
            t,
            format!("has shape {:?} but the layer has {n} {what}", t.shape),
        ));
    }
    Ok(())
}

fn exl2_linear(c: &Checkpoint, module: &str, anchor: &TensorInfo) -> Result<QuantizedLinear> {
    let parts = collect_parts(
        c,
        module,
        EXL2_ROLES,
        &[
            "q_weight",
            "q_scale",
            "q_scale_max",
            "q_groups",
            "q_invperm",
        ],
        anchor,
    )?;
    let t = |role: &str| parts.get(role).map(|&i| &c.tensors()[i]);
    expect(
        c,
        anchor,
        &[Dtype::I32, Dtype::U32],
        None,
        "an EXL2 q_weight",
    )?;
    let (qrows, out) = two_d(c, anchor)?;
    let invperm = &c.tensors()[parts["q_invperm"]];
    let inp = match invperm.shape.as_slice() {
        [n] => *n,
        s => {
            return Err(bad(
                c,
                invperm,
                format!("has shape {s:?}; expected one dimension"),
            ))
        }
    };
    let q_groups = &c.tensors()[parts["q_groups"]];
    let raw = integer_values(c, q_groups)?;
    if raw.is_empty() || raw.len() % 2 != 0 {
        return Err(bad(
            c,
            q_groups,
            format!("has {} values; expected (bits, first row) pairs", raw.len()),
        ));
    }
    let n = raw.len() / 2;
    let mut groups = Vec::with_capacity(n);
    for g in 0..n {
        let (bits, start) = (raw[2 * g], raw[2 * g + 1]);
        let end = if g + 1 < n {
            raw[2 * g + 3]
        } else {
            qrows as i64
        };
        if !(1..=8).contains(&bits) || start < 0 || end < start || end > qrows as i64 {
            return Err(bad(
                c,
                q_groups,
                format!("group {g} has {bits} bits over packed rows {start}..{end} of {qrows}"),
            ));
        }
        let rows = (end - start) as u64 * 32 / bits as u64;
        groups.push(Exl2Group {
            bits: bits as u32,
            rows,
        });
    }
    let rows: u64 = groups.iter().map(|g| g.rows).sum();
    if rows != inp {
        return Err(bad(
            c,
            q_groups,
            format!("describes {rows} input rows but \"{module}.q_invperm\" has {inp}"),
        ));
    }
    expect(
        c,
        &c.tensors()[parts["q_scale"]],
        &[Dtype::I32, Dtype::U32],
        Some(&[n as u64, out.div_ceil(8)]),
        "the packed 4-bit scales of this layer",
    )?;
    expect(
        c,
        &c.tensors()[parts["q_scale_max"]],
        &[Dtype::F16, Dtype::F32],
        Some(&[n as u64]),
        "the scale maxima of this layer",
    )?;
    if let Some(p) = t("q_perm") {
        expect_len(c, p, inp, "inputs")?;
    }
    if let Some(b) = t("bias") {
        expect_len(c, b, out, "outputs")?;
    }
    let weights = (inp * out).max(1) as f64;
    let code_bits: u64 = groups.iter().map(|g| g.rows * g.bits as u64).sum();
    Ok(QuantizedLinear {
        module: module.to_string(),
        in_features: inp,
        out_features: out,
        weight_bits: code_bits as f64 / inp.max(1) as f64,
        bits_per_weight: stored_bits(c, &parts, &["bias", "q_perm", "q_group_map"]) as f64
            / weights,
        scheme: QuantScheme::Exl2 { groups },
        parts,
    })
}
