//! `weightsmith plan`: where each layer of a checkpoint and its KV cache would go, decided
//! before a byte of weights is read.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use planner::{
    CacheDtype, CacheSpec, DeviceSpec, ModelDims, Placement, Plan, PlanRequest, Strategy, UnitSpec,
};
use serde::Serialize;
use st_io::layout::UnitKind;
use st_io::{format_binary, parse_size, Checkpoint, ModelConfig};

use crate::{Error, Result};

/// The version of the JSON document [`PlanReport`] serialises to.
pub const PLAN_SCHEMA_VERSION: u32 = 1;

/// Default cache length when none is asked for.
pub const DEFAULT_CACHE_SEQ_LEN: u64 = 4096;

/// Which devices to plan for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The GPUs of this machine, with their free memory.
    Auto,
    /// Simulated GPUs with these capacities.
    Simulated(Vec<u64>),
}

/// How long a cache to plan for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqLen {
    Tokens(u64),
    /// The largest that fits (up to the model's context length).
    Max,
}

/// How to split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitChoice {
    Greedy,
    Balanced,
    /// Bytes of weights + cache per device.
    Bytes(Vec<u64>),
    /// Decoder layers per device.
    Layers(Vec<u64>),
    /// Each unit's device, from a plan or an accelerate `device_map`.
    Map(crate::DeviceMap),
}

/// Options of [`plan_checkpoint`].
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub devices: DeviceChoice,
    /// One value for every device, or one per device.
    pub reserve_bytes: Vec<u64>,
    /// Overrides the overhead estimate of every device.
    pub overhead_bytes: Option<u64>,
    pub seq_len: SeqLen,
    pub batch: u64,
    pub cache_dtype: CacheDtype,
    pub split: SplitChoice,
    pub embedding_on_host: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            devices: DeviceChoice::Auto,
            reserve_bytes: vec![0],
            overhead_bytes: None,
            seq_len: SeqLen::Tokens(DEFAULT_CACHE_SEQ_LEN),
            batch: 1,
            cache_dtype: CacheDtype::F16,
            split: SplitChoice::Greedy,
            embedding_on_host: false,
        }
    }
}

/// The result of [`plan_checkpoint`]; its JSON form is documented in the README.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub schema_version: u32,
    pub model: String,
    /// Whether `seq_len` was searched for (`--cache-seq-len max`).
    pub seq_len_is_max: bool,
    #[serde(flatten)]
    pub plan: Plan,
    /// accelerate `device_map` module names of each unit.
    #[serde(skip)]
    modules: BTreeMap<String, Vec<String>>,
}

/// Parses `24GiB,24GiB` (or `80GB`, `1073741824`, …) into sizes.
pub fn parse_size_list(text: &str) -> Result<Vec<u64>> {
    text.split(',')
        .map(|s| parse_size(s.trim()).map_err(Error::from))
        .collect()
}

/// Parses `20,24` (GiB, as exllamav2's gpu_split counts) or sizes with units.
pub fn parse_gpu_split(text: &str) -> Result<Vec<u64>> {
    text.split(',')
        .map(|s| {
            let s = s.trim();
            match s.parse::<f64>() {
                Ok(gib) if gib >= 0.0 && gib.is_finite() => {
                    Ok((gib * (1u64 << 30) as f64).round() as u64)
                }
                _ => parse_size(s).map_err(Error::from),
            }
        })
        .collect()
}

/// Plans where a checkpoint's units go. Reads only headers and config.json.
pub fn plan_checkpoint(path: impl AsRef<Path>, options: &PlanOptions) -> Result<PlanReport> {
    let source = crate::source::for_headers(path.as_ref())?;
    let shown = PathBuf::from(source.display());
    let path = shown.as_path();
    let checkpoint = Checkpoint::open(&source.path)?;
    checkpoint.require_complete()?;
    let devices = match &options.devices {
        DeviceChoice::Simulated(c) if !c.is_empty() => c
            .iter()
            .enumerate()
            .map(|(i, &b)| (format!("cuda:{i}"), b))
            .collect(),
        DeviceChoice::Simulated(_) => return Err(Error::Plan(planner::Error::NoDevices)),
        DeviceChoice::Auto => {
            let found = gpu_mem::discover()?;
            if found.is_empty() {
                return Err(Error::Usage(
                    "--devices auto found no GPU (no NVIDIA driver on this machine); simulate GPUs instead, e.g. --devices 24GiB,24GiB".into(),
                ));
            }
            found
                .iter()
                .map(|d| (d.device.to_string(), d.free_bytes))
                .collect()
        }
    };
    plan_for(&checkpoint, path, options, devices)
}

/// The plan `load` follows: the GPUs found (their free memory), or the host when there is none.
pub(crate) fn plan_loaded(
    checkpoint: &Checkpoint,
    path: &Path,
    options: &PlanOptions,
    found: &[gpu_mem::DeviceInfo],
) -> Result<PlanReport> {
    let devices = if found.is_empty() {
        vec![(
            "host".to_string(),
            host_available_bytes().unwrap_or(u64::MAX / 4),
        )]
    } else {
        found
            .iter()
            .map(|d| (d.device.to_string(), d.free_bytes))
            .collect()
    };
    plan_for(checkpoint, path, options, devices)
}

/// MemAvailable from /proc/meminfo.
fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

fn plan_for(
    checkpoint: &Checkpoint,
    path: &Path,
    options: &PlanOptions,
    devices: Vec<(String, u64)>,
) -> Result<PlanReport> {
    let layout = checkpoint.layout();
    let config = checkpoint.config();
    let capacities: Vec<u64> = devices.iter().map(|d| d.1).collect();
    let reserves = match options.reserve_bytes.as_slice() {
        [one] => vec![*one; capacities.len()],
        many if many.len() == capacities.len() => many.to_vec(),
        many => {
            return Err(Error::Usage(format!(
                "--reserve has {} values for {} devices: give one value for all, or one per device",
                many.len(),
                capacities.len()
            )))
        }
    };
    let devices = capacities
        .iter()
        .zip(&reserves)
        .enumerate()
        .map(|(i, (&capacity_bytes, &reserve_bytes))| DeviceSpec {
            name: devices[i].0.clone(),
            capacity_bytes,
            reserve_bytes,
            overhead_bytes: options.overhead_bytes,
        })
        .collect();
    let wants_cache = options.seq_len != SeqLen::Tokens(0);
    let dims = model_dims(checkpoint.root(), config, wants_cache)?;
    let modules = unit_modules(checkpoint, &layout);
    let mut embedding_on_host = options.embedding_on_host;
    let strategy = match &options.split {
        SplitChoice::Greedy => Strategy::Greedy,
        SplitChoice::Balanced => Strategy::Balanced,
        SplitChoice::Bytes(b) => Strategy::ManualBytes(b.clone()),
        SplitChoice::Layers(l) => Strategy::ManualLayers(l.clone()),
        SplitChoice::Map(map) => {
            let names: Vec<String> = layout.units.iter().map(|u| u.name.clone()).collect();
            let placements = map.resolve(&names, &modules)?;
            // The map decides where the embedding goes (a tied head then needs its own copy).
            embedding_on_host = layout
                .units
                .iter()
                .zip(&placements)
                .any(|(u, p)| u.kind == UnitKind::Embedding && *p == Placement::Host);
            Strategy::Fixed(placements)
        }
    };
    let units = layout
        .units
        .iter()
        .map(|u| UnitSpec {
            name: u.name.clone(),
            kind: u.kind,
            weight_bytes: u.bytes,
        })
        .collect();
    let seq_len = match options.seq_len {
        SeqLen::Tokens(n) => n,
        SeqLen::Max => 0,
    };
    let request = PlanRequest {
        units,
        dims,
        cache: CacheSpec {
            seq_len,
            batch: options.batch,
            dtype: options.cache_dtype,
        },
        devices,
        strategy,
        embedding_on_host,
    };
    let plan = match options.seq_len {
        SeqLen::Tokens(_) => planner::plan(&request)?,
        SeqLen::Max => {
            let upper = config
                .and_then(|c| c.max_position_embeddings)
                .unwrap_or(1 << 20);
            planner::max_seq_len(&request, upper)?.1
        }
    };
    Ok(PlanReport {
        schema_version: PLAN_SCHEMA_VERSION,
        model: path.display().to_string(),
        seq_len_is_max: options.seq_len == SeqLen::Max,
        plan,
        modules,
    })
}

/// accelerate's module names of each unit: `model.layers.3` for a layer, the tensors' modules
/// otherwise (`lm_head` for a tied head, whose module exists though its weight is shared).
fn unit_modules(
    checkpoint: &Checkpoint,
    layout: &st_io::layout::ModelLayout,
) -> BTreeMap<String, Vec<String>> {
    let mut modules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for u in &layout.units {
        let mut names: Vec<String> = match (u.kind, &layout.layer_prefix) {
            (UnitKind::Layer(i), Some(prefix)) => vec![format!("{prefix}.{i}")],
            _ => u
                .tensors
                .iter()
                .map(|&t| {
                    let name = &checkpoint.tensors()[t].name;
                    name.rsplit_once('.')
                        .map_or(name.as_str(), |(m, _)| m)
                        .to_string()
                })
                .collect(),
        };
        if u.kind == UnitKind::Head && names.is_empty() {
            names.push("lm_head".into()); // a tied head: the module exists, its weight is shared
        }
        names.dedup();
        modules.insert(u.name.clone(), names);
    }
    modules
}

fn model_dims(root: &Path, config: Option<&ModelConfig>, wants_cache: bool) -> Result<ModelDims> {
    let Some(c) = config else {
        if wants_cache {
            return Err(Error::Usage(format!(
                "{}: no config.json, so the KV cache cannot be sized; pass --cache-seq-len 0 to plan the weights alone",
                root.display()
            )));
        }
        return Ok(ModelDims::default());
    };
    let (kv_heads, head_dim) = match (c.kv_heads(), c.head_dim()) {
        (Some(k), Some(h)) => (k, h),
        _ if wants_cache => {
            return Err(Error::Usage(format!(
                "{}: config.json gives no num_key_value_heads/num_attention_heads and head_dim/hidden_size, so the KV cache cannot be sized; pass --cache-seq-len 0 to plan the weights alone",
                root.display()
            )))
        }
        _ => (0, 0),
    };
    Ok(ModelDims {
        kv_heads,
        head_dim,
        hidden_size: c.hidden_size.unwrap_or(0),
        intermediate_size: c
            .intermediate_size
            .unwrap_or(4 * c.hidden_size.unwrap_or(0)),
        vocab_size: c.vocab_size.unwrap_or(0),
        sliding_window: c.sliding_window,
        sliding_layers: c
            .layer_types
            .as_ref()
            .map(|types| types.iter().map(|t| t == "sliding_attention").collect()),
    })
}

impl PlanReport {
    /// `VLLM_PP_LAYER_PARTITION` for the same split, as a shell line with its use.
    pub fn export_vllm(&self) -> Result<String> {
        let layers = self.plan.layers_per_device();
        if layers.contains(&0) {
            return Err(Error::Usage(format!(
                "the plan leaves a device without layers ({layers:?}), which vLLM's pipeline stages cannot express; plan for fewer devices"
            )));
        }
        let list: Vec<String> = layers.iter().map(u64::to_string).collect();
        Ok(format!(
            "export VLLM_PP_LAYER_PARTITION={}\n# vllm serve {} --pipeline-parallel-size {}\n",
            list.join(","),
            self.model,
            layers.len()
        ))
    }

    /// An accelerate / transformers `device_map` (module → GPU index or "cpu").
    pub fn export_accelerate(&self) -> String {
        let mut map = serde_json::Map::new();
        for u in &self.plan.units {
            let device = match u.device {
                Placement::Host => serde_json::Value::from("cpu"),
                Placement::Device(d) => serde_json::Value::from(d),
            };
            for module in self.modules.get(&u.name).into_iter().flatten() {
                map.insert(module.clone(), device.clone());
            }
        }
        let mut text =
            serde_json::to_string_pretty(&serde_json::Value::Object(map)).unwrap_or_default();
        text.push('\n');
        text
    }

    /// The human-readable form the CLI prints: a table per device.
    pub fn to_text(&self) -> String {
        let p = &self.plan;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: {} plan on {} device(s); KV cache {} token(s){} × {} sequence(s) in {}",
            self.model,
            p.strategy,
            p.devices.len(),
            p.cache.seq_len,
            if self.seq_len_is_max {
                " (the most that fits)"
            } else {
                ""
            },
            p.cache.batch,
            p.cache.dtype.name(),
        );
        let _ = writeln!(
            s,
            "\n  {:<8} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}  units",
            "device", "capacity", "reserve", "weights", "kv cache", "overhead", "free after"
        );
        for d in &p.devices {
            let _ = writeln!(
                s,
                "  {:<8} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}  {}",
                d.name,
                format_binary(d.capacity_bytes),
                format_binary(d.reserve_bytes),
                format_binary(d.weight_bytes),
                format_binary(d.cache_bytes),
                format_binary(d.overhead_bytes),
                format_binary(d.free_after_bytes),
                compact_units(&d.units),
            );
        }
        if p.host_bytes > 0 {
            let host: Vec<String> = p
                .units
                .iter()
                .filter(|u| u.device == Placement::Host)
                .map(|u| u.name.clone())
                .collect();
            let _ = writeln!(
                s,
                "  {:<8} {:>11} {:>11} {:>11}  {}",
                "host",
                "",
                "",
                format_binary(p.host_bytes),
                host.join(", ")
            );
        }
        let layers: Vec<String> = p.layers_per_device().iter().map(u64::to_string).collect();
        let _ = writeln!(s, "\n  layers per device: {}", layers.join(", "));
        s
    }
}

/// `embedding, layers.0-17, norm` from a unit list.
pub(crate) fn compact_units(units: &[String]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    let flush = |run: &mut Option<(u64, u64)>, parts: &mut Vec<String>| {
        if let Some((a, b)) = run.take() {
            parts.push(if a == b {
                format!("layers.{a}")
            } else {
                format!("layers.{a}-{b}")
            });
        }
    };
    for u in units {
        match u
            .strip_prefix("layers.")
            .and_then(|n| n.parse::<u64>().ok())
        {
            Some(i) => match run {
                Some((a, b)) if b + 1 == i => run = Some((a, i)),
                _ => {
                    flush(&mut run, &mut parts);
                    run = Some((i, i));
                }
            },
            None => {
                flush(&mut run, &mut parts);
                parts.push(u.clone());
            }
        }
    }
    flush(&mut run, &mut parts);
    if parts.is_empty() {
        "(unused)".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacts_layer_runs() {
        let units: Vec<String> = [
            "embedding",
            "layers.0",
            "layers.1",
            "layers.2",
            "layers.4",
            "norm",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            compact_units(&units),
            "embedding, layers.0-2, layers.4, norm"
        );
        assert_eq!(compact_units(&[]), "(unused)");
    }

    #[test]
    fn parses_gpu_splits_like_exllamav2() {
        assert_eq!(parse_gpu_split("20,24").unwrap(), vec![20 << 30, 24 << 30]);
        assert_eq!(
            parse_gpu_split("1.5, 500MB").unwrap(),
            vec![3 << 29, 500_000_000]
        );
        assert!(parse_gpu_split("x").is_err());
        assert_eq!(
            parse_size_list("24GiB,8GiB").unwrap(),
            vec![24 << 30, 8 << 30]
        );
    }
}
