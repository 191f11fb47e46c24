//! Architecture knowledge, as data: what transformers itself says about each model family.
//!
//! `architectures.json` is written by `scripts/fixtures/make_arch_matrix.py`, which builds a tiny model
//! of every family in the matrix with transformers and records, per `model_type`:
//! - the tensors a checkpoint holds, as templates (`model.layers.{i}.mlp.experts.{e}.w1.weight`):
//!   the model's own (embedding, norm, head) and each kind of decoder layer (dense, MoE);
//! - which boolean config fields add or remove tensors (`attention_bias`, a tied head), and the
//!   config field that counts experts;
//! - transformers' checkpoint conversion, traced element by element: which in-memory parameter
//!   (and which block of which expert of a fused 3-D parameter) each on-disk tensor holds;
//! - the in-memory parameters in registration order (PEFT nests its parameter wrappers so).
//!
//! [`completeness`] checks a checkpoint against its family (missing and unexpected tensors),
//! and falls back to comparing decoder layers with each other for a family it does not know.
//! [`in_memory`] maps an on-disk tensor to the in-memory parameter PEFT's `target_parameters`
//! and `target_modules` name. Everything here is pure: names, shapes and config values in.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::layout::{classify, TensorPlace};

/// One family of `architectures.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Family {
    pub model_type: String,
    /// The `*ForCausalLM` class the matrix built.
    pub architecture: String,
    /// Tensors outside the decoder layers.
    pub model_tensors: Vec<String>,
    /// Each kind of decoder layer (one for most families; dense and MoE for some), as templates.
    pub layer_kinds: Vec<Vec<String>>,
    /// The config field holding the number of routed experts (`num_local_experts`, …).
    pub expert_count_field: Option<String>,
    /// Boolean config fields that change which tensors exist.
    pub toggles: BTreeMap<String, Toggle>,
    /// On-disk tensor template → the in-memory parameter it is (part of).
    pub conversion: BTreeMap<String, Conversion>,
    /// In-memory parameter templates, in registration order.
    pub parameters: Vec<String>,
    /// Fused expert parameters stored `[experts, in, out]` (`is_transposed`), not `[experts,
    /// out, in]`.
    #[serde(default)]
    pub transposed_experts: Vec<String>,
    /// Tensors transformers keeps in F32 in a 16-bit model (`_keep_in_fp32_modules`): loaded
    /// and saved in F32 whatever the checkpoint holds.
    #[serde(default)]
    pub keep_in_fp32: Vec<String>,
}

impl Family {
    /// Whether transformers keeps `name` in F32 in a 16-bit model of this family.
    pub fn keeps_in_fp32(&self, name: &str) -> bool {
        self.keep_in_fp32
            .iter()
            .any(|t| match_template(t, name).is_some())
    }
}

/// A boolean config field that adds or removes tensors.
#[derive(Debug, Clone, Deserialize)]
pub struct Toggle {
    /// The value the family's templates were made with.
    pub value: bool,
    /// transformers' default when config.json does not have the field.
    pub class_default: bool,
    pub added_when_flipped: Vec<String>,
    pub removed_when_flipped: Vec<String>,
}

/// Where an on-disk tensor lives in memory.
#[derive(Debug, Clone, Deserialize)]
pub struct Conversion {
    /// In-memory parameter template.
    pub param: String,
    /// `None`: the whole parameter, renamed. Otherwise one expert's block of a 3-D parameter.
    #[serde(default)]
    pub block: Option<BlockSpec>,
    /// The on-disk tensor is the block transposed.
    #[serde(default)]
    pub transposed: bool,
}

/// How transformers cut an on-disk tensor out of one expert's `[d1, d2]` matrix.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum BlockSpec {
    /// Rows `row_chunk` of `row_chunks` equal chunks, columns likewise.
    Chunks {
        row_chunk: u64,
        row_chunks: u64,
        col_chunk: u64,
        col_chunks: u64,
    },
    /// A conversion the trace could not express as blocks (never merged into).
    Unsupported(String),
}

const ARCHITECTURES_JSON: &str = include_str!("architectures.json");

/// Every family the matrix covers, by `model_type`.
pub fn families() -> &'static BTreeMap<String, Family> {
    static FAMILIES: OnceLock<BTreeMap<String, Family>> = OnceLock::new();
    FAMILIES.get_or_init(|| {
        // The file is embedded and checked by this module's tests: a parse failure is a build
        // defect, and an empty table only turns the checks into the layer comparison.
        serde_json::from_str(ARCHITECTURES_JSON).unwrap_or_default()
    })
}

/// The family of a config's `model_type`, if the matrix covers it.
pub fn family(config: Option<&ModelConfig>) -> Option<&'static Family> {
    let model_type = config?.model_type.as_deref()?;
    families().get(model_type)
}

/// Matches `name` against a template; returns the layer and expert index it holds.
pub fn match_template(template: &str, name: &str) -> Option<(Option<u64>, Option<u64>)> {
    let mut t = template.split('.');
    let mut n = name.split('.');
    let (mut layer, mut expert) = (None, None);
    loop {
        match (t.next(), n.next()) {
            (None, None) => return Some((layer, expert)),
            (Some("{i}"), Some(p)) => layer = Some(p.parse().ok()?),
            (Some("{e}"), Some(p)) => expert = Some(p.parse().ok()?),
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
}

/// Fills a template's `{i}` and `{e}`.
pub fn fill(template: &str, layer: Option<u64>, expert: Option<u64>) -> String {
    template
        .split('.')
        .map(|p| match (p, layer, expert) {
            ("{i}", Some(i), _) => i.to_string(),
            ("{e}", _, Some(e)) => e.to_string(),
            _ => p.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// A field of config.json, at the top or in `text_config`.
fn config_field<'a>(config: &'a ModelConfig, field: &str) -> Option<&'a Value> {
    config
        .raw
        .get(field)
        .or_else(|| config.raw.get("text_config").and_then(|t| t.get(field)))
        .filter(|v| !v.is_null())
}

/// What a checkpoint lacks, or has beyond, its architecture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completeness {
    /// The family the checkpoint was checked against (`None`: layers compared with each other).
    pub family: Option<String>,
    /// Tensors that must be there and are not: each with why it is expected.
    pub missing: Vec<Missing>,
    /// Tensors the architecture does not have (transformers ignores them when loading).
    pub unexpected: Vec<String>,
    /// What the check could not decide, for `inspect`.
    pub notes: Vec<String>,
}

/// One missing tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub tensor: String,
    /// Why it is expected: "a MixtralForCausalLM layer has it", "every other layer has it", …
    pub reason: String,
    /// A tensor present beside it (same layer, or the nearest by name): its file is where the
    /// missing one belongs.
    pub beside: Option<String>,
}

impl Completeness {
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Config fields that announce layers built differently (dense and MoE, attention kinds).
const LAYER_PATTERN_FIELDS: &[&str] = &[
    "mlp_only_layers",
    "first_k_dense_replace",
    "decoder_sparse_step",
    "moe_layer_freq",
    "moe_layers",
    "dense_layers",
    "interleave_moe_layer_step",
    "no_rope_layers",
    "layer_types",
    "sliding_window_pattern",
    "block_types",
    "hybrid_override_pattern",
    "attn_layer_indices",
    "layers_block_type",
];

/// Whether config.json says its layers differ from each other.
fn layers_differ_by_config(config: Option<&ModelConfig>) -> Option<&'static str> {
    let config = config?;
    LAYER_PATTERN_FIELDS.iter().copied().find(|f| {
        match config_field(config, f) {
            Some(Value::Array(a)) => {
                let distinct: BTreeSet<String> = a.iter().map(|v| v.to_string()).collect();
                !a.is_empty() && (distinct.len() > 1 || *f == "mlp_only_layers")
            }
            Some(Value::Number(n)) => {
                // first_k_dense_replace 0, decoder_sparse_step 1 and the like change nothing.
                let v = n.as_f64().unwrap_or(0.0);
                match *f {
                    "decoder_sparse_step" | "moe_layer_freq" | "interleave_moe_layer_step" => {
                        v > 1.0
                    }
                    _ => v > 0.0,
                }
            }
            Some(Value::String(s)) => !s.is_empty(),
            _ => false,
        }
    })
}

/// Checks a checkpoint's tensor names against its architecture.
///
/// A family the matrix knows: every layer must be one of the family's layer kinds, with the
/// expert count and the boolean fields of config.json applied, and the model's own tensors must
/// be there. A layer with a tensor the family does not have *and* one missing is a variant the
/// matrix did not see (a quantised layer, another attention): it falls back to the comparison
/// below instead of being refused. Any other family: the decoder layers are compared with each
/// other; a tensor at least half the layers have is missing from the others, unless config.json
/// announces layers built differently.
pub fn completeness<'a>(
    names: impl IntoIterator<Item = &'a str>,
    config: Option<&ModelConfig>,
) -> Completeness {
    // A quantised linear layer (GPTQ, AWQ: qweight, qzeros, scales, g_idx; EXL2: q_weight,
    // q_scale, …) stands for the `.weight` the architecture names, so a quantised checkpoint
    // is checked as strictly as a 16-bit one (and a quantised part missing is caught by the
    // quantisation checks, which name it).
    let raw: Vec<&str> = names.into_iter().collect();
    let coded: std::collections::HashSet<&str> = raw
        .iter()
        .filter_map(|n| {
            n.strip_suffix(".qweight")
                .or_else(|| n.strip_suffix(".q_weight"))
        })
        .collect();
    let logical: BTreeSet<String> = raw
        .iter()
        .map(|n| match n.rsplit_once('.') {
            Some((module, part))
                if coded.contains(module)
                    && part != "bias"
                    && crate::quant::ROLES.iter().any(|r| r.contains(&part)) =>
            {
                format!("{module}.weight")
            }
            _ => n.to_string(),
        })
        .collect();
    let names: Vec<&str> = logical.iter().map(String::as_str).collect();
    let mut out = Completeness::default();
    // Decoder layers of the main stack, by index; the rest is the model's own.
    let mut prefix_count: BTreeMap<String, usize> = BTreeMap::new();
    for n in &names {
        if let TensorPlace::Layer { prefix, .. } = classify(n) {
            *prefix_count.entry(prefix).or_default() += 1;
        }
    }
    let main_prefix = prefix_count
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(p, _)| p.clone());
    let mut layers: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    let mut model_level: BTreeSet<&str> = BTreeSet::new();
    for n in &names {
        match classify(n) {
            TensorPlace::Layer { prefix, index } if Some(&prefix) == main_prefix.as_ref() => {
                layers.entry(index).or_default().insert(n);
            }
            _ => {
                model_level.insert(n);
            }
        }
    }
    if let Some(n) = config.and_then(|c| c.num_hidden_layers) {
        // Only layers config.json announces are checked (a missing layer is its own error).
        for i in 0..n.min(1 << 20) {
            layers.entry(i).or_default();
        }
    }
    let nearest = |t: &str| -> Option<String> {
        names
            .iter()
            .min_by_key(|n| common_prefix_penalty(n, t))
            .map(|n| n.to_string())
    };
    let mut compare_layers = true;
    if let (Some(f), Some(cfg)) = (family(config), config) {
        out.family = Some(f.architecture.clone());
        let flipped: Vec<&Toggle> = f
            .toggles
            .iter()
            .filter(|(field, t)| {
                let value = match config_field(cfg, field) {
                    Some(Value::Bool(b)) => *b,
                    _ => t.class_default,
                };
                value != t.value
            })
            .map(|(_, t)| t)
            .collect();
        let adjust = |set: &mut BTreeSet<String>, layer_templates: bool| {
            for t in &flipped {
                for a in &t.added_when_flipped {
                    if a.contains("{i}") == layer_templates {
                        set.insert(a.clone());
                    }
                }
                for r in &t.removed_when_flipped {
                    set.remove(r);
                }
            }
        };
        let found_experts = names
            .iter()
            .filter_map(|n| {
                let parts: Vec<&str> = n.split('.').collect();
                parts
                    .windows(2)
                    .find(|w| w[0] == "experts")
                    .and_then(|w| w[1].parse::<u64>().ok())
            })
            .max()
            .map(|e| e + 1);
        let experts = f
            .expert_count_field
            .as_deref()
            .and_then(|field| config_field(cfg, field))
            .and_then(Value::as_u64)
            .or(found_experts)
            .unwrap_or(0)
            .min(1 << 16);
        let mut model_expected: BTreeSet<String> = f.model_tensors.iter().cloned().collect();
        adjust(&mut model_expected, false);
        for t in &model_expected {
            if !model_level.contains(t.as_str()) {
                out.missing.push(Missing {
                    tensor: t.clone(),
                    reason: format!("a {} has it", f.architecture),
                    beside: nearest(t),
                });
            }
        }
        let kinds: Vec<BTreeSet<String>> = f
            .layer_kinds
            .iter()
            .map(|k| {
                let mut s: BTreeSet<String> = k.iter().cloned().collect();
                adjust(&mut s, true);
                s
            })
            .collect();
        let mut variant = false;
        let mut layer_missing = Vec::new();
        for (i, present) in &layers {
            let best = kinds
                .iter()
                .map(|k| {
                    let expected: BTreeSet<String> = k
                        .iter()
                        .flat_map(|t| {
                            let per_layer = fill(t, Some(*i), None);
                            if per_layer.contains("{e}") {
                                (0..experts)
                                    .map(|e| fill(&per_layer, None, Some(e)))
                                    .collect::<Vec<_>>()
                            } else {
                                vec![per_layer]
                            }
                        })
                        .collect();
                    let missing: Vec<String> = expected
                        .iter()
                        .filter(|t| !present.contains(t.as_str()))
                        .cloned()
                        .collect();
                    let unexpected: Vec<String> = present
                        .iter()
                        .filter(|n| !expected.contains(**n))
                        .map(|n| n.to_string())
                        .collect();
                    (missing, unexpected)
                })
                .min_by_key(|(m, u)| m.len() + u.len());
            let Some((missing, unexpected)) = best else {
                break;
            };
            if !missing.is_empty() && !unexpected.is_empty() && !present.is_empty() {
                variant = true;
                out.notes.push(format!(
                    "layer {i} is not laid out as a {} layer (it has \"{}\" and lacks \"{}\"): its layers were compared with each other instead",
                    f.architecture, unexpected[0], missing[0]
                ));
                break;
            }
            let beside = present.iter().next().map(|s| s.to_string());
            for m in missing {
                layer_missing.push(Missing {
                    beside: beside.clone().or_else(|| nearest(&m)),
                    tensor: m,
                    reason: if present.is_empty() {
                        format!("config.json announces layer {i}")
                    } else {
                        format!("a {} layer has it", f.architecture)
                    },
                });
            }
            out.unexpected.extend(unexpected);
        }
        if !variant {
            compare_layers = false;
            out.missing.extend(layer_missing);
        } else {
            out.unexpected.clear();
        }
        let model_unexpected: Vec<String> = model_level
            .iter()
            .filter(|n| !model_expected.contains(**n))
            .map(|n| n.to_string())
            .collect();
        out.unexpected.extend(model_unexpected);
    }
    if compare_layers {
        compare_layers_alike(&layers, main_prefix.as_deref(), config, &mut out);
    }
    out.missing.sort_by(|a, b| a.tensor.cmp(&b.tensor));
    out.missing.dedup_by(|a, b| a.tensor == b.tensor);
    out
}

/// How far apart two names are, for "the nearest tensor": fewer shared leading bytes is farther.
fn common_prefix_penalty(a: &str, b: &str) -> usize {
    let shared = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    usize::MAX - shared
}

/// The fallback: a tensor at least half of the decoder layers have is missing from the others.
fn compare_layers_alike(
    layers: &BTreeMap<u64, BTreeSet<&str>>,
    prefix: Option<&str>,
    config: Option<&ModelConfig>,
    out: &mut Completeness,
) {
    let Some(prefix) = prefix else { return };
    let populated: Vec<(u64, BTreeSet<String>)> = layers
        .iter()
        .filter(|(_, s)| !s.is_empty())
        .map(|(i, s)| {
            let lead = format!("{prefix}.{i}.");
            let rel = s
                .iter()
                .filter_map(|n| n.strip_prefix(&lead).map(String::from))
                .collect();
            (*i, rel)
        })
        .collect();
    let n = populated.len();
    if n < 2 {
        return;
    }
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, s) in &populated {
        for name in s {
            *count.entry(name.as_str()).or_default() += 1;
        }
    }
    let uneven: Vec<(&str, usize)> = count
        .iter()
        .filter(|(_, k)| **k < n)
        .map(|(name, k)| (*name, *k))
        .collect();
    if uneven.is_empty() {
        return;
    }
    if let Some(field) = layers_differ_by_config(config) {
        out.notes.push(format!(
            "layers differ (e.g. \"{}\" is in {} of {n} layers), as config.json's \"{field}\" allows",
            uneven[0].0, uneven[0].1
        ));
        return;
    }
    for (name, k) in uneven {
        if 2 * k >= n {
            for (i, s) in &populated {
                if !s.contains(name) {
                    out.missing.push(Missing {
                        tensor: format!("{prefix}.{i}.{name}"),
                        reason: format!("{k} of the {n} layers have it"),
                        beside: s.iter().next().map(|x| format!("{prefix}.{i}.{x}")),
                    });
                }
            }
        } else {
            out.notes.push(format!(
                "\"{prefix}.N.{name}\" is in only {k} of {n} layers"
            ));
        }
    }
}

/// An on-disk tensor's place in memory: the parameter PEFT names, and the block of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InMemory {
    /// In-memory parameter name, e.g. `model.layers.0.mlp.experts.gate_up_proj`.
    pub param: String,
    /// `Some` for one expert's block of a fused 3-D parameter.
    pub block: Option<ExpertBlock>,
}

/// One expert's block of a fused `[experts, d1, d2]` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertBlock {
    pub expert: u64,
    pub row_chunk: u64,
    pub row_chunks: u64,
    pub col_chunk: u64,
    pub col_chunks: u64,
    /// The on-disk tensor is the block transposed.
    pub transposed: bool,
}

/// Where `name` lives in memory under transformers' conversion, when it differs from its name
/// on disk. `Err` names a conversion weightsmith cannot express as blocks.
pub fn in_memory(family: &Family, name: &str) -> Result<Option<InMemory>, String> {
    for (template, c) in &family.conversion {
        let Some((layer, expert)) = match_template(template, name) else {
            continue;
        };
        let param = fill(&c.param, layer, None);
        return match (&c.block, expert) {
            (None, _) => Ok(Some(InMemory { param, block: None })),
            (
                Some(BlockSpec::Chunks {
                    row_chunk,
                    row_chunks,
                    col_chunk,
                    col_chunks,
                }),
                Some(expert),
            ) => Ok(Some(InMemory {
                param,
                block: Some(ExpertBlock {
                    expert,
                    row_chunk: *row_chunk,
                    row_chunks: *row_chunks,
                    col_chunk: *col_chunk,
                    col_chunks: *col_chunks,
                    transposed: c.transposed,
                }),
            })),
            _ => Err(format!(
                "transformers converts \"{name}\" into \"{param}\" in a way weightsmith cannot merge into"
            )),
        };
    }
    Ok(None)
}

/// The in-memory parameters directly under `module` (`{module}.{name}`), in registration order.
pub fn module_parameters(family: &Family, module: &str) -> Vec<String> {
    family
        .parameters
        .iter()
        .filter_map(|t| {
            let (m, p) = t.rsplit_once('.')?;
            let (layer, _) = match_template(m, module)?;
            Some(format!("{}.{p}", fill(m, layer, None)))
        })
        .collect()
}

/// Token embeddings: the tensors config.json's `vocab_size` describes (position embeddings
/// have rows for positions, not tokens).
pub fn is_token_embedding(name: &str) -> bool {
    const TOKEN: &[&str] = &[
        "embed_tokens",
        "wte",
        "word_embeddings",
        "tok_embeddings",
        "embed_in",
    ];
    module_has_part(name, TOKEN)
}

/// Whether a component of the tensor's module path is one of `parts`.
fn module_has_part(name: &str, parts: &[&str]) -> bool {
    let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
    module.split('.').any(|p| parts.contains(&p))
}

/// Position and token-type embeddings (`wpe`, `embed_positions`, …).
pub fn is_position_embedding(name: &str) -> bool {
    const POSITION: &[&str] = &[
        "wpe",
        "embed_positions",
        "position_embeddings",
        "token_type_embeddings",
    ];
    module_has_part(name, POSITION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(json: &str) -> ModelConfig {
        ModelConfig::parse(Path::new("config.json"), json.as_bytes()).unwrap()
    }

    #[test]
    fn embedded_table_parses_and_covers_the_matrix() {
        let parsed: BTreeMap<String, Family> = serde_json::from_str(ARCHITECTURES_JSON).unwrap();
        assert!(parsed.len() >= 25, "{} families", parsed.len());
        assert_eq!(families().len(), parsed.len());
    }

    #[test]
    fn embedded_table_is_the_matrix_output() {
        let matrix = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/matrix/architectures.json"
        ))
        .unwrap();
        assert!(
            matrix == ARCHITECTURES_JSON,
            "copy fixtures/matrix/architectures.json to crates/st-io/src/architectures.json"
        );
    }

    #[test]
    fn templates_match_layers_and_experts() {
        let t = "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight";
        assert_eq!(
            match_template(t, "model.layers.3.block_sparse_moe.experts.5.w1.weight"),
            Some((Some(3), Some(5)))
        );
        assert_eq!(
            match_template(t, "model.layers.x.block_sparse_moe.experts.5.w1.weight"),
            None
        );
        assert_eq!(match_template(t, "model.layers.3.block_sparse_moe"), None);
        assert_eq!(
            fill(t, Some(1), Some(2)),
            "model.layers.1.block_sparse_moe.experts.2.w1.weight"
        );
    }

    #[test]
    fn mixtral_experts_map_to_fused_parameters() {
        let f = &families()["mixtral"];
        let w3 = in_memory(f, "model.layers.1.block_sparse_moe.experts.2.w3.weight")
            .unwrap()
            .unwrap();
        assert_eq!(w3.param, "model.layers.1.mlp.experts.gate_up_proj");
        let b = w3.block.unwrap();
        assert_eq!((b.expert, b.row_chunk, b.row_chunks), (2, 1, 2));
        let gate = in_memory(f, "model.layers.0.block_sparse_moe.gate.weight")
            .unwrap()
            .unwrap();
        assert_eq!(gate.param, "model.layers.0.mlp.gate.weight");
        assert_eq!(
            in_memory(f, "model.layers.0.self_attn.q_proj.weight").unwrap(),
            None
        );
        assert_eq!(
            module_parameters(f, "model.layers.4.mlp.experts"),
            [
                "model.layers.4.mlp.experts.gate_up_proj",
                "model.layers.4.mlp.experts.down_proj"
            ]
        );
    }

    #[test]
    fn a_missing_tensor_of_a_known_family_is_found_in_one_and_two_layers() {
        let llama = |layers: u64| {
            config(&format!(
                r#"{{"model_type":"llama","num_hidden_layers":{layers},"tie_word_embeddings":false}}"#
            ))
        };
        let layer = |i: u64| {
            [
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ]
            .map(|t| format!("model.layers.{i}.{t}"))
        };
        let model = [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
        ];
        for layers in [1, 2] {
            let mut names: Vec<String> = model.iter().map(|s| s.to_string()).collect();
            for i in 0..layers {
                names.extend(layer(i));
            }
            let c = llama(layers);
            let all = completeness(names.iter().map(String::as_str), Some(&c));
            assert!(all.is_complete(), "{all:?}");
            assert!(all.unexpected.is_empty(), "{all:?}");
            let gone = format!("model.layers.{}.mlp.up_proj.weight", layers - 1);
            let fewer = names.iter().filter(|n| **n != gone).map(String::as_str);
            let r = completeness(fewer, Some(&c));
            assert_eq!(r.missing.len(), 1, "{r:?}");
            assert_eq!(r.missing[0].tensor, gone);
            // A tied config needs no head, an untied one does.
            let no_head = names.iter().filter(|n| *n != "lm_head.weight");
            let r = completeness(no_head.map(String::as_str), Some(&c));
            assert_eq!(r.missing[0].tensor, "lm_head.weight");
        }
    }

    #[test]
    fn a_bias_field_changes_what_is_expected() {
        let on = config(r#"{"model_type":"llama","num_hidden_layers":1,"attention_bias":true}"#);
        let names = [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ];
        let r = completeness(names, Some(&on));
        assert!(
            r.missing
                .iter()
                .any(|m| m.tensor == "model.layers.0.self_attn.q_proj.bias"),
            "{r:?}"
        );
    }

    #[test]
    fn unknown_families_compare_layers_from_two_up() {
        let c = config(r#"{"model_type":"something_new","num_hidden_layers":2}"#);
        let names = [
            "m.layers.0.a.weight",
            "m.layers.0.b.weight",
            "m.layers.1.a.weight",
        ];
        let r = completeness(names, Some(&c));
        assert_eq!(r.family, None);
        assert_eq!(r.missing.len(), 1, "{r:?}");
        assert_eq!(r.missing[0].tensor, "m.layers.1.b.weight");
        // config.json announcing dense and sparse layers explains the difference.
        let c =
            config(r#"{"model_type":"something_new","num_hidden_layers":2,"mlp_only_layers":[0]}"#);
        assert!(completeness(names, Some(&c)).is_complete());
    }

    #[test]
    fn variants_the_matrix_did_not_see_are_compared_not_refused() {
        // A GPTQ layer: qweight where the family has weight.
        let c =
            config(r#"{"model_type":"llama","num_hidden_layers":1,"tie_word_embeddings":true}"#);
        let mut names = vec![
            "model.embed_tokens.weight".to_string(),
            "model.norm.weight".to_string(),
            "model.layers.0.input_layernorm.weight".to_string(),
            "model.layers.0.post_attention_layernorm.weight".to_string(),
        ];
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            names.push(format!("model.layers.0.self_attn.{m}.qweight"));
        }
        for m in ["gate_proj", "up_proj", "down_proj"] {
            names.push(format!("model.layers.0.mlp.{m}.qweight"));
        }
        for m in ["q_proj", "o_proj", "down_proj"] {
            let part = if m == "down_proj" { "mlp" } else { "self_attn" };
            for q in ["qzeros", "scales", "g_idx"] {
                names.push(format!("model.layers.0.{part}.{m}.{q}"));
            }
        }
        // A quantised layer stands for its .weight: checked as the family's own layer.
        let r = completeness(names.iter().map(String::as_str), Some(&c));
        assert!(r.is_complete() && r.notes.is_empty(), "{r:?}");
        // … so a quantised projection missing is caught, as in a 16-bit checkpoint.
        let short: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| !n.contains("v_proj"))
            .collect();
        let r = completeness(short, Some(&c));
        assert!(!r.is_complete(), "{r:?}");
        assert!(
            r.missing
                .iter()
                .any(|m| m.tensor == "model.layers.0.self_attn.v_proj.weight"),
            "{r:?}"
        );
        // A layout the matrix did not see (fused qkv): compared, not refused, and said.
        let mut fused: Vec<String> = names
            .iter()
            .filter(|n| !["q_proj", "k_proj", "v_proj"].iter().any(|m| n.contains(m)))
            .cloned()
            .collect();
        fused.push("model.layers.0.self_attn.qkv_proj.weight".into());
        let r = completeness(fused.iter().map(String::as_str), Some(&c));
        assert!(r.is_complete(), "{r:?}");
        assert!(!r.notes.is_empty());
    }

    #[test]
    fn token_and_position_embeddings_are_told_apart() {
        assert!(is_token_embedding("transformer.wte.weight"));
        assert!(!is_token_embedding("transformer.wpe.weight"));
        assert!(is_position_embedding(
            "model.decoder.embed_positions.weight"
        ));
        assert!(is_token_embedding("model.decoder.embed_tokens.weight"));
        assert!(!is_position_embedding("lm_head.weight"));
    }
}
