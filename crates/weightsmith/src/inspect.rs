//! `weightsmith inspect`: what a checkpoint holds and what is wrong with it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use st_io::layout::UnitKind;
use st_io::{format_decimal, Checkpoint, LayoutKind, ModelConfig, Problem};

use crate::Result;

/// The version of the JSON document [`InspectReport`] serialises to.
pub const INSPECT_SCHEMA_VERSION: u32 = 1;

/// What to include.
#[derive(Debug, Clone, Default)]
pub struct InspectOptions {
    /// List every tensor.
    pub tensors: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub name: String,
    pub bytes: u64,
    pub header_bytes: u64,
    pub tensors: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DtypeCount {
    pub tensors: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UnitReport {
    pub name: String,
    pub kind: &'static str,
    pub tensors: usize,
    pub bytes: u64,
    /// The unit's quantised linear layers, summarised (absent when it has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<UnitQuantization>,
}

/// The quantised linear layers of one placement unit.
#[derive(Debug, Clone, Serialize)]
pub struct UnitQuantization {
    /// `gptq`, `exl2` or `awq` (`mixed` if the unit has several).
    pub format: String,
    pub linears: usize,
    /// Bits of the codes per weight, over the unit's quantised weights.
    pub weight_bits: f64,
    /// Every stored bit (codes, scales, zeros, indices) per weight.
    pub bits_per_weight: f64,
}

/// One quantised linear layer.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizedLinearReport {
    pub module: String,
    pub unit: String,
    pub in_features: u64,
    pub out_features: u64,
    pub weight_bits: f64,
    pub bits_per_weight: f64,
    /// The format and its parameters (GPTQ: bits, group size, act-order, zero offset; EXL2:
    /// its groups of rows and their bits).
    pub scheme: st_io::QuantScheme,
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub file: String,
    pub offset: u64,
    pub bytes: u64,
    pub unit: String,
}

/// The result of [`inspect()`]; its JSON form is documented in the README.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub schema_version: u32,
    pub path: String,
    pub layout: LayoutKind,
    pub files: Vec<FileReport>,
    pub tensor_count: usize,
    /// Bytes of tensor data (headers excluded).
    pub total_bytes: u64,
    pub dtypes: BTreeMap<String, DtypeCount>,
    pub config: Option<ModelConfig>,
    pub layer_prefix: Option<String>,
    pub tied_embeddings: bool,
    pub units: Vec<UnitReport>,
    /// Quantised linear layers (GPTQ, EXL2, AWQ), in tensor order; empty for a float model.
    pub quantized_linears: Vec<QuantizedLinearReport>,
    pub problems: Vec<Problem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<Vec<TensorReport>>,
}

/// Opens and validates a checkpoint and reports on it. Invalid input is an error; oddities
/// that do not stop the checkpoint from being used are listed in `problems`.
pub fn inspect(path: impl AsRef<Path>, options: &InspectOptions) -> Result<InspectReport> {
    let source = crate::source::for_headers(path.as_ref())?;
    let checkpoint = Checkpoint::open(&source.path)?;
    let linears = st_io::quant::quantized_linears(&checkpoint)?;
    checkpoint.check_intact()?;
    Ok(report(
        Path::new(&source.display()),
        &checkpoint,
        &linears,
        options,
    ))
}

fn kind_name(kind: UnitKind) -> &'static str {
    match kind {
        UnitKind::Embedding => "embedding",
        UnitKind::Layer(_) => "layer",
        UnitKind::Norm => "norm",
        UnitKind::Head => "head",
        UnitKind::Other => "other",
    }
}

fn report(
    path: &Path,
    checkpoint: &Checkpoint,
    linears: &[st_io::QuantizedLinear],
    options: &InspectOptions,
) -> InspectReport {
    let tensors = checkpoint.tensors();
    let layout = checkpoint.layout();
    let mut unit_of_tensor = vec![usize::MAX; tensors.len()];
    for (u, unit) in layout.units.iter().enumerate() {
        for &t in &unit.tensors {
            unit_of_tensor[t] = u;
        }
    }
    // Each linear belongs to the unit of its first part.
    let linear_unit: Vec<usize> = linears
        .iter()
        .map(|l| {
            l.parts
                .values()
                .next()
                .map_or(usize::MAX, |&t| unit_of_tensor[t])
        })
        .collect();
    let unit_quantization = |u: usize| -> Option<UnitQuantization> {
        let members: Vec<&st_io::QuantizedLinear> = linears
            .iter()
            .zip(&linear_unit)
            .filter(|(_, &lu)| lu == u)
            .map(|(l, _)| l)
            .collect();
        let first = members.first()?;
        let weights: f64 = members
            .iter()
            .map(|l| (l.in_features * l.out_features) as f64)
            .sum();
        let mean = |f: fn(&st_io::QuantizedLinear) -> f64| {
            members
                .iter()
                .map(|l| f(l) * (l.in_features * l.out_features) as f64)
                .sum::<f64>()
                / weights.max(1.0)
        };
        let format = if members
            .iter()
            .all(|l| l.scheme.format() == first.scheme.format())
        {
            first.scheme.format().to_string()
        } else {
            "mixed".to_string()
        };
        Some(UnitQuantization {
            format,
            linears: members.len(),
            weight_bits: mean(|l| l.weight_bits),
            bits_per_weight: mean(|l| l.bits_per_weight),
        })
    };
    let mut per_file = vec![0usize; checkpoint.files().len()];
    let mut dtypes: BTreeMap<String, DtypeCount> = BTreeMap::new();
    for t in tensors {
        per_file[t.file] += 1;
        let entry = dtypes.entry(t.dtype.to_string()).or_default();
        entry.tensors += 1;
        entry.bytes += t.len;
    }
    let files = checkpoint
        .files()
        .iter()
        .zip(per_file)
        .map(|(f, n)| FileReport {
            name: f.name.clone(),
            bytes: f.len,
            header_bytes: 8 + f.header_len,
            tensors: n,
        })
        .collect();
    let mut problems: Vec<Problem> = checkpoint.problems().to_vec();
    let completeness = checkpoint.completeness();
    for m in &completeness.missing {
        problems.push(Problem {
            subject: m.tensor.clone(),
            message: format!(
                "tensor \"{}\" is missing ({}){}; plan, load and merge refuse the checkpoint",
                m.tensor,
                m.reason,
                checkpoint
                    .file_beside(m)
                    .map(|f| format!("; it belongs in {f}"))
                    .unwrap_or_default()
            ),
        });
    }
    for u in &completeness.unexpected {
        problems.push(Problem {
            subject: u.clone(),
            message: format!(
                "tensor \"{u}\" is not part of a {} (transformers ignores it when loading)",
                completeness
                    .family
                    .as_deref()
                    .unwrap_or("model of this architecture")
            ),
        });
    }
    problems.extend(completeness.notes.iter().map(|n| Problem {
        subject: "layers".into(),
        message: n.clone(),
    }));
    problems.extend(layout.notes.iter().map(|n| Problem {
        subject: "layout".into(),
        message: n.clone(),
    }));
    let tensor_reports = options.tensors.then(|| {
        let mut unit_of = vec![""; tensors.len()];
        for u in &layout.units {
            for &t in &u.tensors {
                unit_of[t] = &u.name;
            }
        }
        tensors
            .iter()
            .zip(unit_of)
            .map(|(t, unit)| TensorReport {
                name: t.name.clone(),
                dtype: t.dtype.to_string(),
                shape: t.shape.clone(),
                file: checkpoint.files()[t.file].name.clone(),
                offset: t.offset,
                bytes: t.len,
                unit: unit.to_string(),
            })
            .collect()
    });
    InspectReport {
        schema_version: INSPECT_SCHEMA_VERSION,
        path: path.display().to_string(),
        layout: checkpoint.kind(),
        files,
        tensor_count: tensors.len(),
        total_bytes: checkpoint.total_tensor_bytes(),
        dtypes,
        config: checkpoint.config().cloned(),
        layer_prefix: layout.layer_prefix.clone(),
        tied_embeddings: layout.tied_embeddings,
        units: layout
            .units
            .iter()
            .enumerate()
            .map(|(i, u)| UnitReport {
                name: u.name.clone(),
                kind: kind_name(u.kind),
                tensors: u.tensors.len(),
                bytes: u.bytes,
                quantization: unit_quantization(i),
            })
            .collect(),
        quantized_linears: linears
            .iter()
            .zip(&linear_unit)
            .map(|(l, &u)| QuantizedLinearReport {
                module: l.module.clone(),
                unit: layout
                    .units
                    .get(u)
                    .map_or_else(String::new, |u| u.name.clone()),
                in_features: l.in_features,
                out_features: l.out_features,
                weight_bits: l.weight_bits,
                bits_per_weight: l.bits_per_weight,
                scheme: l.scheme.clone(),
            })
            .collect(),
        problems,
        tensors: tensor_reports,
    }
}

/// `GPTQ 4-bit, group 128, act-order`, `EXL2 (4/6-bit groups)`, `AWQ 4-bit`.
fn describe_scheme(scheme: &st_io::QuantScheme) -> String {
    match scheme {
        st_io::QuantScheme::Gptq(p) => format!(
            "GPTQ {}-bit, group {}{}{}",
            p.bits,
            p.group_size,
            if p.act_order { ", act-order" } else { "" },
            if p.zero_offset == 0 {
                ", gptq_v2 zeros"
            } else {
                ""
            }
        ),
        st_io::QuantScheme::Exl2 { groups } => {
            let mut bits: Vec<u32> = groups.iter().map(|g| g.bits).collect();
            bits.sort_unstable();
            bits.dedup();
            let bits: Vec<String> = bits.iter().map(u32::to_string).collect();
            format!("EXL2 ({}-bit groups)", bits.join("/"))
        }
        st_io::QuantScheme::Awq { bits } => format!("AWQ {bits}-bit"),
    }
}

impl InspectReport {
    /// The human-readable form the CLI prints.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let layout = match self.layout {
            LayoutKind::SingleFile => "single safetensors file",
            LayoutKind::Folder => "folder with one safetensors file",
            LayoutKind::Sharded => "sharded folder with index",
        };
        let _ = writeln!(s, "{}", self.path);
        let _ = writeln!(s, "  layout:   {layout}, {} file(s)", self.files.len());
        let _ = writeln!(
            s,
            "  tensors:  {} ({} of data)",
            self.tensor_count,
            format_decimal(self.total_bytes)
        );
        let dtypes: Vec<String> = self
            .dtypes
            .iter()
            .map(|(d, c)| format!("{d} ×{} ({})", c.tensors, format_decimal(c.bytes)))
            .collect();
        let _ = writeln!(s, "  dtypes:   {}", dtypes.join(", "));
        if let Some(c) = &self.config {
            let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
            let _ = writeln!(
                s,
                "  model:    {} ({}), {} layers, hidden {}, heads {}, kv heads {}, head dim {}, vocab {}",
                c.architectures.first().map_or("?", String::as_str),
                c.model_type.as_deref().unwrap_or("?"),
                opt(c.num_hidden_layers),
                opt(c.hidden_size),
                opt(c.num_attention_heads),
                opt(c.kv_heads()),
                opt(c.head_dim()),
                opt(c.vocab_size),
            );
            let mut extra = Vec::new();
            if let Some(d) = &c.torch_dtype {
                extra.push(format!("dtype {d}"));
            }
            if let Some(w) = c.sliding_window {
                extra.push(format!("sliding window {w}"));
            }
            if let Some(q) = &c.quantization {
                let kind = match &q.kind {
                    st_io::QuantKind::Gptq => "gptq".to_string(),
                    st_io::QuantKind::Awq => "awq".to_string(),
                    st_io::QuantKind::Exl2 => "exl2".to_string(),
                    st_io::QuantKind::Bitsandbytes => "bitsandbytes".to_string(),
                    st_io::QuantKind::Other(m) => m.clone(),
                };
                extra.push(format!(
                    "quantized: {kind}{}",
                    q.bits.map(|b| format!(" {b}-bit")).unwrap_or_default()
                ));
            }
            if !extra.is_empty() {
                let _ = writeln!(s, "            {}", extra.join(", "));
            }
        }
        let _ = writeln!(
            s,
            "  tied embeddings: {}",
            if self.tied_embeddings { "yes" } else { "no" }
        );
        if !self.quantized_linears.is_empty() {
            let mut formats: BTreeMap<String, (usize, f64, f64)> = BTreeMap::new();
            for l in &self.quantized_linears {
                let w = (l.in_features * l.out_features) as f64;
                let e = formats.entry(describe_scheme(&l.scheme)).or_default();
                e.0 += 1;
                e.1 += w;
                e.2 += w * l.bits_per_weight;
            }
            for (scheme, (n, w, bits)) in formats {
                let _ = writeln!(
                    s,
                    "  quantised: {n} linear layer(s) {scheme}, {:.2} bits per weight with scales and zeros",
                    bits / w.max(1.0)
                );
            }
        }
        let quantised = self.units.iter().any(|u| u.quantization.is_some());
        let _ = write!(s, "\n  {:<14} {:>8} {:>12}", "unit", "tensors", "bytes");
        let _ = writeln!(
            s,
            "{}",
            if quantised {
                "  quantised (bits/weight: codes, all)"
            } else {
                ""
            }
        );
        for u in &self.units {
            let _ = write!(
                s,
                "  {:<14} {:>8} {:>12}",
                u.name,
                u.tensors,
                format_decimal(u.bytes)
            );
            let _ = match &u.quantization {
                Some(q) => writeln!(
                    s,
                    "  {} ×{}: {:.2}, {:.2}",
                    q.format, q.linears, q.weight_bits, q.bits_per_weight
                ),
                None => writeln!(s),
            };
        }
        if let Some(tensors) = &self.tensors {
            let _ = writeln!(s, "\n  tensors:");
            for t in tensors {
                let _ = writeln!(
                    s,
                    "  {:<60} {:<8} {:<20} {:>12}  {} @{}",
                    t.name,
                    t.dtype,
                    format!("{:?}", t.shape),
                    t.bytes,
                    t.file,
                    t.offset
                );
            }
        }
        if self.problems.is_empty() {
            let _ = writeln!(s, "\n  problems: none");
        } else {
            let _ = writeln!(s, "\n  problems:");
            for p in &self.problems {
                let _ = writeln!(s, "  - {}: {}", p.subject, p.message);
            }
        }
        s
    }
}
