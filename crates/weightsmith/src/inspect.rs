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
    pub problems: Vec<Problem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<Vec<TensorReport>>,
}

/// Opens and validates a checkpoint and reports on it. Invalid input is an error; oddities
/// that do not stop the checkpoint from being used are listed in `problems`.
pub fn inspect(path: impl AsRef<Path>, options: &InspectOptions) -> Result<InspectReport> {
    let path = path.as_ref();
    let checkpoint = Checkpoint::open(path)?;
    Ok(report(path, &checkpoint, options))
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

fn report(path: &Path, checkpoint: &Checkpoint, options: &InspectOptions) -> InspectReport {
    let tensors = checkpoint.tensors();
    let layout = checkpoint.layout();
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
            .map(|u| UnitReport {
                name: u.name.clone(),
                kind: kind_name(u.kind),
                tensors: u.tensors.len(),
                bytes: u.bytes,
            })
            .collect(),
        problems,
        tensors: tensor_reports,
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
        let _ = writeln!(s, "\n  {:<14} {:>8} {:>12}", "unit", "tensors", "bytes");
        for u in &self.units {
            let _ = writeln!(
                s,
                "  {:<14} {:>8} {:>12}",
                u.name,
                u.tensors,
                format_decimal(u.bytes)
            );
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
