//! PEFT LoRA adapters: `adapter_config.json` and `adapter_model.safetensors`.
//!
//! Reads what PEFT's `save_pretrained` writes: keys `base_model.model.<module>.lora_A.weight`
//! and `lora_B.weight` (with or without an adapter name before `.weight`), `lora_B.bias`
//! (`lora_bias`), `lora_embedding_A`/`lora_embedding_B` (embedding LoRA),
//! `lora_magnitude_vector` (DoRA), `<module>.base_layer.weight` (a saved embedding, e.g. after
//! the vocabulary was resized), and full tensors of `modules_to_save` (and of trained biases
//! with `bias: "all"|"lora_only"`). Ranks and alphas follow `rank_pattern`/`alpha_pattern` with
//! PEFT's matching rule; scaling is alpha/r, or alpha/√r with `use_rslora`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::error::{Error, Result};

pub const ADAPTER_CONFIG_NAME: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_NAME: &str = "adapter_model.safetensors";

/// `target_modules`: names matched as suffixes, or one regular expression matched in full.
#[derive(Debug, Clone)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(Regex),
}

impl TargetModules {
    /// PEFT's rule: a name equal to the module or ending it after a dot; a regex in full.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            TargetModules::Names(names) => names
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            TargetModules::Regex(re) => re.is_match(module),
        }
    }
}

/// The parsed `adapter_config.json`.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub r: u64,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// `(pattern, rank)` in file order; patterns are regular expressions.
    pub rank_pattern: Vec<(Regex, u64)>,
    pub alpha_pattern: Vec<(Regex, f64)>,
    pub target_modules: Option<TargetModules>,
    /// `target_parameters`: parameters (e.g. fused 3-D experts, `experts.gate_up_proj`) that
    /// PEFT wraps directly; a name matches a parameter equal to it or ending with it after a dot.
    pub target_parameters: Vec<String>,
    pub fan_in_fan_out: bool,
    pub use_dora: bool,
    pub modules_to_save: Vec<String>,
    pub layers_to_transform: Option<Vec<u64>>,
    /// `none`, `all` or `lora_only`.
    pub bias: String,
    pub lora_bias: bool,
    pub base_model_name_or_path: Option<String>,
}

/// Fields that do not change the merged weights.
const BENIGN_FIELDS: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "fan_in_fan_out",
    "use_dora",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "lora_bias",
    "base_model_name_or_path",
    "auto_mapping",
    "inference_mode",
    "task_type",
    "revision",
    "lora_dropout",
    "init_lora_weights",
    "megatron_config",
    "megatron_core",
    "peft_version",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "exclude_modules",
    "layer_replication",
    "runtime_config",
    "use_qalora",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "ensure_weight_tying",
    "arrow_config",
];

fn anchored(file: &Path, field: &str, pattern: &str) -> Result<Regex> {
    // PEFT: re.match(rf"(.*\.)?({key})$", module) — a prefix ending in a dot, then the key.
    Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).map_err(|e| Error::BadAdapterConfig {
        file: file.to_path_buf(),
        field: field.to_string(),
        message: format!(
            "pattern \"{pattern}\" is not a regular expression weightsmith can use: {e}"
        ),
    })
}

impl AdapterConfig {
    /// Parses `adapter_config.json` bytes; `file` names the file in errors.
    pub fn parse(file: &Path, bytes: &[u8]) -> Result<AdapterConfig> {
        let field_error = |field: &str, message: String| Error::BadAdapterConfig {
            file: file.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::BadConfig {
            file: file.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(c) = value else {
            return Err(Error::BadConfig {
                file: file.to_path_buf(),
                message: "must be a JSON object".into(),
            });
        };
        match c.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => {
                return Err(field_error(
                    "peft_type",
                    format!("{other} adapters are not supported; weightsmith merges LORA adapters (LoRA, rsLoRA, DoRA)"),
                ))
            }
            None => return Err(field_error("peft_type", "missing; expected \"LORA\"".into())),
        }
        // Fields that change the merge and that weightsmith does not implement.
        for (key, v) in &c {
            let is_default = matches!(v, Value::Null | Value::Bool(false))
                || v.as_array().is_some_and(|a| a.is_empty())
                || v.as_object().is_some_and(|o| o.is_empty());
            let unhandled = [
                "layer_replication",
                "use_qalora",
                "trainable_token_indices",
                "alora_invocation_tokens",
            ];
            if (unhandled.contains(&key.as_str()) || !BENIGN_FIELDS.contains(&key.as_str()))
                && !is_default
            {
                return Err(field_error(
                    key,
                    format!(
                        "{v} is not supported by weightsmith's merge yet; merge with PEFT instead"
                    ),
                ));
            }
        }
        let uint = |k: &str| -> Result<Option<u64>> {
            match c.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().filter(|&n| n > 0).map(Some).ok_or_else(|| {
                    field_error(k, format!("expected a positive integer, found {v}"))
                }),
            }
        };
        let flag = |k: &str| -> Result<bool> {
            match c.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(field_error(k, format!("expected true or false, found {v}"))),
            }
        };
        let r = uint("r")?.ok_or_else(|| field_error("r", "missing".into()))?;
        let lora_alpha = match c.get("lora_alpha") {
            None | Some(Value::Null) => r as f64,
            Some(v) => v.as_f64().ok_or_else(|| {
                field_error("lora_alpha", format!("expected a number, found {v}"))
            })?,
        };
        let mut rank_pattern = Vec::new();
        if let Some(Value::Object(p)) = c.get("rank_pattern") {
            for (k, v) in p {
                let rank = v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    field_error(
                        "rank_pattern",
                        format!("rank of \"{k}\" must be a positive integer, found {v}"),
                    )
                })?;
                rank_pattern.push((anchored(file, "rank_pattern", k)?, rank));
            }
        }
        let mut alpha_pattern = Vec::new();
        if let Some(Value::Object(p)) = c.get("alpha_pattern") {
            for (k, v) in p {
                let alpha = v.as_f64().ok_or_else(|| {
                    field_error(
                        "alpha_pattern",
                        format!("alpha of \"{k}\" must be a number, found {v}"),
                    )
                })?;
                alpha_pattern.push((anchored(file, "alpha_pattern", k)?, alpha));
            }
        }
        let target_modules = match c.get("target_modules") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(TargetModules::Regex(
                Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                    field_error(
                        "target_modules",
                        format!("\"{s}\" is not a usable regular expression: {e}"),
                    )
                })?,
            )),
            Some(Value::Array(items)) => Some(TargetModules::Names(
                items
                    .iter()
                    .map(|i| {
                        i.as_str().map(String::from).ok_or_else(|| {
                            field_error("target_modules", format!("expected names, found {i}"))
                        })
                    })
                    .collect::<Result<_>>()?,
            )),
            Some(v) => {
                return Err(field_error(
                    "target_modules",
                    format!("expected a list of names or a regular expression, found {v}"),
                ))
            }
        };
        let strings = |k: &str| -> Result<Vec<String>> {
            match c.get(k) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(String::from)
                            .ok_or_else(|| field_error(k, format!("expected names, found {i}")))
                    })
                    .collect(),
                Some(v) => Err(field_error(
                    k,
                    format!("expected a list of names, found {v}"),
                )),
            }
        };
        let layers_to_transform = match c.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(v) if v.is_u64() => v.as_u64().map(|n| vec![n]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|i| {
                        i.as_u64().ok_or_else(|| {
                            field_error(
                                "layers_to_transform",
                                format!("expected layer indices, found {i}"),
                            )
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(v) => {
                return Err(field_error(
                    "layers_to_transform",
                    format!("expected layer indices, found {v}"),
                ))
            }
        };
        let bias = match c.get("bias") {
            None | Some(Value::Null) => "none".to_string(),
            Some(Value::String(s)) if ["none", "all", "lora_only"].contains(&s.as_str()) => {
                s.clone()
            }
            Some(v) => {
                return Err(field_error(
                    "bias",
                    format!("expected \"none\", \"all\" or \"lora_only\", found {v}"),
                ))
            }
        };
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora: flag("use_rslora")?,
            rank_pattern,
            alpha_pattern,
            target_modules,
            target_parameters: strings("target_parameters")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            use_dora: flag("use_dora")?,
            modules_to_save: strings("modules_to_save")?,
            layers_to_transform,
            bias,
            lora_bias: flag("lora_bias")?,
            base_model_name_or_path: c
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(String::from),
        })
    }

    /// Rank of a module: the first matching `rank_pattern`, else `r`.
    pub fn rank_for(&self, module: &str) -> u64 {
        self.rank_pattern
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map_or(self.r, |(_, r)| *r)
    }

    /// Alpha of a module: the first matching `alpha_pattern`, else `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map_or(self.lora_alpha, |(_, a)| *a)
    }

    /// Whether `target_parameters` names the in-memory parameter `param` (PEFT's rule: equal,
    /// or ending with the name after a dot).
    pub fn targets_parameter(&self, param: &str) -> bool {
        self.target_parameters
            .iter()
            .any(|t| param == t || param.ends_with(&format!(".{t}")))
    }

    /// Whether some `target_parameters` entry can name a parameter of `module`.
    fn may_target_parameters_of(&self, module: &str) -> bool {
        self.target_parameters
            .iter()
            .any(|t| match t.rsplit_once('.') {
                Some((m, _)) => module == m || module.ends_with(&format!(".{m}")),
                None => true,
            })
    }

    /// The LoRA scaling of a module: alpha / r, or alpha / √r with rsLoRA.
    pub fn scaling_for(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// How a module's LoRA applies to its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraKind {
    /// `W [out, in] += s · B [out, r] · A [r, in]` (transposed when `fan_in_fan_out`).
    Linear,
    /// `W [vocab, hidden] += s · (B [hidden, r] · A [r, vocab])ᵀ`.
    Embedding,
}

/// The LoRA tensors of one module.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// Module path in the base model, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub kind: LoraKind,
    pub a: TensorInfo,
    pub b: TensorInfo,
    pub lora_bias: Option<TensorInfo>,
    pub magnitude: Option<TensorInfo>,
    pub rank: u64,
    pub scaling: f64,
}

/// The LoRA of one targeted parameter (`target_parameters`, PEFT's `ParamWrapper`).
///
/// PEFT wraps every targeted parameter of a module in its own wrapper, nested in the order the
/// module registers its parameters, the last one outermost: its keys are `<module>.lora_A`, the
/// one inside it `<module>.base_layer.lora_A`, and so on. Which parameter a depth is, and so its
/// rank (`rank_pattern` matches `<module>.<parameter>`), is known only with the base model:
/// `A` is `[rank · experts, in]` and `B` `[out, rank · experts]`.
#[derive(Debug, Clone)]
pub struct ParamLora {
    /// Module path, e.g. `model.layers.0.mlp.experts`.
    pub module: String,
    /// Wrappers outside this one (0: the outermost).
    pub depth: usize,
    pub a: TensorInfo,
    pub b: TensorInfo,
}

/// A LoRA adapter folder, its tensors memory-mapped.
#[derive(Debug)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub config: AdapterConfig,
    pub weights: Checkpoint,
    /// By module path, in order.
    pub modules: BTreeMap<String, LoraModule>,
    /// LoRA on parameters (`target_parameters`), by module path and nesting depth.
    pub parameter_loras: BTreeMap<(String, usize), ParamLora>,
    /// Base tensor name → adapter tensor replacing it (modules_to_save, saved embeddings,
    /// trained biases).
    pub replacements: BTreeMap<String, TensorInfo>,
}

const PREFIX: &str = "base_model.model.";

/// Splits `<module>.<part>[.<adapter name>][.weight]` keys into module and part.
fn split_key(rest: &str) -> Option<(&str, &'static str)> {
    const PARTS: &[&str] = &[
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    ];
    let pieces: Vec<&str> = rest.split('.').collect();
    for (i, p) in pieces.iter().enumerate().rev() {
        if let Some(part) = PARTS.iter().find(|x| *x == p) {
            let tail = &pieces[i + 1..];
            // lora_B.bias is its own part.
            if *part == "lora_B" && tail.last() == Some(&"bias") {
                return Some((
                    &rest[..rest.len() - pieces[i..].join(".").len() - 1],
                    "lora_B.bias",
                ));
            }
            let ok = match tail {
                [] => true,
                ["weight"] => true,
                [_name] => {
                    !part.ends_with("_A") && !part.ends_with("_B")
                        || part.starts_with("lora_embedding")
                }
                [_name, "weight"] => true,
                _ => false,
            };
            if ok && i > 0 {
                let module_len = pieces[..i].join(".").len();
                return Some((&rest[..module_len], part));
            }
        }
    }
    None
}

/// LoRA factors are F32, F16 or BF16; otherwise the message names the tensor.
fn lora_float_dtypes(a: &TensorInfo, b: &TensorInfo) -> std::result::Result<(), String> {
    for t in [a, b] {
        if !matches!(
            t.dtype,
            crate::Dtype::F32 | crate::Dtype::F16 | crate::Dtype::BF16
        ) {
            return Err(format!(
                "\"{}\" is {}; LoRA weights must be F32, F16 or BF16",
                t.name, t.dtype
            ));
        }
    }
    Ok(())
}

impl LoraAdapter {
    /// Opens an adapter folder (or its `adapter_model.safetensors`).
    pub fn open(path: impl AsRef<Path>) -> Result<LoraAdapter> {
        let path = path.as_ref();
        let dir = if path.is_file() {
            path.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            path.to_path_buf()
        };
        if !dir.exists() {
            return Err(Error::NotFound { path: dir });
        }
        let config_path = dir.join(ADAPTER_CONFIG_NAME);
        let bytes = crate::paths::read_regular(&config_path)?;
        let config = AdapterConfig::parse(&config_path, &bytes)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS_NAME);
        if !weights_path.exists() {
            let bin = dir.join("adapter_model.bin");
            let message = if bin.exists() {
                "has adapter_model.bin but no adapter_model.safetensors; weightsmith does not read pickle files (they can run code). Convert it with PEFT: PeftModel.from_pretrained(base, dir).save_pretrained(out, safe_serialization=True)".to_string()
            } else {
                "has no adapter_model.safetensors".to_string()
            };
            return Err(Error::NotACheckpoint { path: dir, message });
        }
        let weights = Checkpoint::open(&weights_path)?;
        let mut parts: BTreeMap<String, BTreeMap<&'static str, TensorInfo>> = BTreeMap::new();
        let mut replacements = BTreeMap::new();
        for t in weights.tensors() {
            let bad = |message: String| Error::BadAdapterTensor {
                file: weights_path.clone(),
                tensor: t.name.clone(),
                message,
            };
            let Some(rest) = t.name.strip_prefix(PREFIX) else {
                return Err(bad(format!(
                    "does not start with \"{PREFIX}\", so it is not a PEFT LoRA tensor"
                )));
            };
            if let Some((module, part)) = split_key(rest) {
                if parts
                    .entry(module.to_string())
                    .or_default()
                    .insert(part, t.clone())
                    .is_some()
                {
                    return Err(bad(format!("a second \"{part}\" for module \"{module}\" (several adapters in one file?)")));
                }
                continue;
            }
            // base_layer.weight, modules_to_save.<name>.<param>, or a full tensor.
            let target = if let Some(m) = rest.strip_suffix(".base_layer.weight") {
                format!("{m}.weight")
            } else if let Some(i) = rest.find(".modules_to_save.") {
                let after = &rest[i + ".modules_to_save.".len()..];
                let param = after.split_once('.').map_or(after, |(_, p)| p);
                format!("{}.{param}", &rest[..i])
            } else {
                rest.to_string()
            };
            let module = target.rsplit_once('.').map_or(target.as_str(), |(m, _)| m);
            let saved = config
                .modules_to_save
                .iter()
                .any(|s| module == s || module.ends_with(&format!(".{s}")));
            let trained_bias = target.ends_with(".bias") && config.bias != "none";
            let saved_base_layer = rest.ends_with(".base_layer.weight");
            if !(saved || trained_bias || saved_base_layer) {
                return Err(bad(
                    "is neither a LoRA tensor nor a module listed in modules_to_save".into(),
                ));
            }
            replacements.insert(target, t.clone());
        }
        let mut modules = BTreeMap::new();
        let mut parameter_loras = BTreeMap::new();
        for (module, mut p) in parts {
            // Nested parameter wrappers: `<module>.base_layer[.base_layer…]`.
            let mut unwrapped = module.as_str();
            let mut depth = 0;
            while let Some(inner) = unwrapped.strip_suffix(".base_layer") {
                unwrapped = inner;
                depth += 1;
            }
            let named_by_modules = config
                .target_modules
                .as_ref()
                .is_some_and(|t| t.matches(unwrapped));
            if !config.target_parameters.is_empty()
                && (depth > 0 || !named_by_modules)
                && config.may_target_parameters_of(unwrapped)
            {
                let bad = |message: String| Error::BadAdapterModule {
                    file: weights_path.clone(),
                    module: unwrapped.to_string(),
                    message,
                };
                let (Some(a), Some(b)) = (p.remove("lora_A"), p.remove("lora_B")) else {
                    return Err(bad(
                        "a LoRA on parameters needs both lora_A and lora_B".into()
                    ));
                };
                if let Some(extra) = p.keys().next() {
                    return Err(bad(format!(
                        "has \"{extra}\", which PEFT does not make for a LoRA on parameters"
                    )));
                }
                if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[0] != b.shape[1] {
                    return Err(bad(format!(
                        "A has shape {:?} and B {:?}: A must be [rank · experts, in] and B [out, rank · experts]",
                        a.shape, b.shape
                    )));
                }
                lora_float_dtypes(&a, &b).map_err(bad)?;
                parameter_loras.insert(
                    (unwrapped.to_string(), depth),
                    ParamLora {
                        module: unwrapped.to_string(),
                        depth,
                        a,
                        b,
                    },
                );
                continue;
            }
            let bad = |message: String| Error::BadAdapterModule {
                file: weights_path.clone(),
                module: module.clone(),
                message,
            };
            let (kind, a, b) =
                match (
                    p.remove("lora_A"),
                    p.remove("lora_B"),
                    p.remove("lora_embedding_A"),
                    p.remove("lora_embedding_B"),
                ) {
                    (Some(a), Some(b), None, None) => (LoraKind::Linear, a, b),
                    (None, None, Some(a), Some(b)) => (LoraKind::Embedding, a, b),
                    _ => return Err(bad(
                        "needs both lora_A and lora_B (or lora_embedding_A and lora_embedding_B)"
                            .into(),
                    )),
                };
            let rank = config.rank_for(&module);
            let (a_rank, b_rank) = (a.shape.first().copied(), b.shape.get(1).copied());
            if a.shape.len() != 2
                || b.shape.len() != 2
                || a_rank != Some(rank)
                || b_rank != Some(rank)
            {
                return Err(bad(format!(
                    "A has shape {:?} and B {:?}, but the config gives this module rank {rank}",
                    a.shape, b.shape
                )));
            }
            lora_float_dtypes(&a, &b).map_err(bad)?;
            let magnitude = p.remove("lora_magnitude_vector");
            if magnitude.is_some() != config.use_dora && kind == LoraKind::Linear {
                return Err(bad(if config.use_dora {
                    "use_dora is set but the module has no lora_magnitude_vector".into()
                } else {
                    "has a lora_magnitude_vector but use_dora is not set".into()
                }));
            }
            let lora_bias = p.remove("lora_B.bias");
            if lora_bias.is_some() && !config.lora_bias {
                return Err(bad("has lora_B.bias but lora_bias is not set".into()));
            }
            if let Some(targets) = &config.target_modules {
                if !targets.matches(&module) {
                    return Err(bad(
                        "has LoRA weights but target_modules does not name it".into()
                    ));
                }
            }
            let scaling = config.scaling_for(&module);
            modules.insert(
                module.clone(),
                LoraModule {
                    module,
                    kind,
                    a,
                    b,
                    lora_bias,
                    magnitude,
                    rank,
                    scaling,
                },
            );
        }
        if modules.is_empty() && parameter_loras.is_empty() && replacements.is_empty() {
            return Err(Error::NotACheckpoint {
                path: weights_path,
                message: "holds no LoRA tensors".into(),
            });
        }
        Ok(LoraAdapter {
            path: dir,
            config,
            weights,
            modules,
            parameter_loras,
            replacements,
        })
    }

    /// The bytes of one of the adapter's tensors.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        self.weights.tensor_bytes(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> Result<AdapterConfig> {
        AdapterConfig::parse(Path::new("adapter_config.json"), s.as_bytes())
    }

    #[test]
    fn splits_peft_keys() {
        assert_eq!(
            split_key("model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj", "lora_A"))
        );
        assert_eq!(
            split_key("model.layers.0.q_proj.lora_B.default.weight"),
            Some(("model.layers.0.q_proj", "lora_B"))
        );
        assert_eq!(
            split_key("model.layers.0.q_proj.lora_B.bias"),
            Some(("model.layers.0.q_proj", "lora_B.bias"))
        );
        assert_eq!(
            split_key("model.embed_tokens.lora_embedding_A"),
            Some(("model.embed_tokens", "lora_embedding_A"))
        );
        assert_eq!(
            split_key("model.embed_tokens.lora_embedding_B.default"),
            Some(("model.embed_tokens", "lora_embedding_B"))
        );
        assert_eq!(
            split_key("model.layers.0.q_proj.lora_magnitude_vector"),
            Some(("model.layers.0.q_proj", "lora_magnitude_vector"))
        );
        assert_eq!(split_key("lm_head.weight"), None);
        assert_eq!(split_key("model.embed_tokens.base_layer.weight"), None);
    }

    #[test]
    fn matches_patterns_as_peft_does() {
        let c = cfg(r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"rank_pattern":{"q_proj":4,"layers.1.mlp.down_proj":16},"alpha_pattern":{"v_proj":32},"use_rslora":true,"target_modules":".*\\.(q_proj|v_proj)"}"#).unwrap();
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 4);
        assert_eq!(c.rank_for("model.layers.1.mlp.down_proj"), 16);
        assert_eq!(
            c.rank_for("model.layers.11.mlp.down_proj"),
            8,
            "the pattern must end a dotted prefix"
        );
        assert_eq!(c.rank_for("model.layers.0.self_attn.xq_proj"), 8);
        assert_eq!(c.alpha_for("model.layers.0.self_attn.v_proj"), 32.0);
        assert!(
            (c.scaling_for("model.layers.0.self_attn.v_proj") - 32.0 / 8f64.sqrt()).abs() < 1e-12
        );
        let t = c.target_modules.unwrap();
        assert!(t.matches("model.layers.0.self_attn.q_proj"));
        assert!(!t.matches("model.layers.0.self_attn.q_proj.x"));
        let names = TargetModules::Names(vec!["q_proj".into()]);
        assert!(
            names.matches("model.layers.0.q_proj")
                && names.matches("q_proj")
                && !names.matches("model.xq_proj")
        );
    }

    #[test]
    fn rejects_what_it_cannot_merge() {
        let e = cfg(r#"{"peft_type":"IA3","r":8}"#).unwrap_err().to_string();
        assert!(e.contains("IA3 adapters are not supported"), "{e}");
        let e = cfg(r#"{"peft_type":"LORA","r":8,"layer_replication":[[0,4]]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("field \"layer_replication\""), "{e}");
        let e = cfg(r#"{"peft_type":"LORA","r":8,"new_peft_feature":{"x":1}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("field \"new_peft_feature\""), "{e}");
        assert!(
            cfg(r#"{"peft_type":"LORA","r":8,"new_peft_feature":null,"lora_dropout":0.1}"#).is_ok()
        );
        let e = cfg(r#"{"peft_type":"LORA","r":0}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field \"r\": expected a positive integer"),
            "{e}"
        );
        let e = cfg(r#"{"peft_type":"LORA","r":8,"rank_pattern":{"(":4}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank_pattern"), "{e}");
    }
}
