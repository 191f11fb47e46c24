//! Grouping tensors into placement units, in model order: the embedding, each decoder layer,
//! the final norm, the head, and `other` for whatever matches nothing (kept and reported).
//!
//! Pure: it works on names and byte counts, so the planner and the tests feed it directly.

use std::collections::BTreeMap;

use serde::Serialize;

/// What a placement unit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "index")]
pub enum UnitKind {
    Embedding,
    Layer(u64),
    Norm,
    Head,
    Other,
}

/// A group of tensors that is placed on one device as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlacementUnit {
    /// `embedding`, `layers.N`, `norm`, `head` or `other`.
    pub name: String,
    pub kind: UnitKind,
    /// Indices into the tensor list the layout was built from.
    pub tensors: Vec<usize>,
    /// Bytes of those tensors (a tied head counts zero: its weight is the embedding's).
    pub bytes: u64,
}

/// The placement units of a model, plus what the grouping noticed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelLayout {
    pub units: Vec<PlacementUnit>,
    /// The name prefix of the decoder layers (`model.layers`, `transformer.h`, …).
    pub layer_prefix: Option<String>,
    /// The head reuses the embedding's weight (no head tensor stored).
    pub tied_embeddings: bool,
    /// Things a user should know: tensors that matched nothing, missing layers, a layer count
    /// that disagrees with config.json.
    pub notes: Vec<String>,
}

impl ModelLayout {
    /// Number of decoder layers found.
    pub fn layer_count(&self) -> usize {
        self.units
            .iter()
            .filter(|u| matches!(u.kind, UnitKind::Layer(_)))
            .count()
    }

    pub fn total_bytes(&self) -> u64 {
        self.units.iter().map(|u| u.bytes).sum()
    }
}

/// Path components that hold the numbered decoder layers.
const LAYER_CONTAINERS: &[&str] = &["layers", "h", "blocks", "layer", "block", "decoder_layers"];
const EMBEDDING_PARTS: &[&str] = &[
    "embed_tokens",
    "wte",
    "wpe",
    "word_embeddings",
    "word_embeddings_layernorm",
    "embed_in",
    "tok_embeddings",
    "embed_positions",
    "position_embeddings",
    "token_type_embeddings",
];
const NORM_PARTS: &[&str] = &[
    "norm",
    "ln_f",
    "final_layernorm",
    "final_layer_norm",
    "final_norm",
    "norm_f",
];
const HEAD_PARTS: &[&str] = &["lm_head", "embed_out", "output", "score"];

/// Where one tensor goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorPlace {
    Embedding,
    Layer { prefix: String, index: u64 },
    Norm,
    Head,
    Other,
}

/// Classifies one tensor name. Layer detection wins: the first `<container>.<N>.` in the name,
/// e.g. `model.layers.7.`, `transformer.h.7.`, `model.decoder.layers.7.`, `gpt_neox.layers.7.`.
pub fn classify(name: &str) -> TensorPlace {
    let parts: Vec<&str> = name.split('.').collect();
    for i in 0..parts.len().saturating_sub(2) {
        if LAYER_CONTAINERS.contains(&parts[i]) {
            if let Ok(index) = parts[i + 1].parse::<u64>() {
                return TensorPlace::Layer {
                    prefix: parts[..=i].join("."),
                    index,
                };
            }
        }
    }
    // The last component is the parameter (`weight`, `bias`, …); the module path is before it.
    let module = &parts[..parts.len().saturating_sub(1)];
    if module.iter().any(|p| EMBEDDING_PARTS.contains(p)) {
        TensorPlace::Embedding
    } else if module.iter().any(|p| HEAD_PARTS.contains(p)) {
        TensorPlace::Head
    } else if module.iter().any(|p| NORM_PARTS.contains(p)) {
        TensorPlace::Norm
    } else {
        TensorPlace::Other
    }
}

/// Groups `(name, bytes)` tensors into placement units in model order.
///
/// `config_layers` (config.json's layer count) and `config_ties` (its `tie_word_embeddings`)
/// are cross-checked when given. Layers under a second prefix (a vision tower beside the
/// language model) go to `other` and are reported.
pub fn group<'a>(
    tensors: impl IntoIterator<Item = (&'a str, u64)>,
    config_layers: Option<u64>,
    config_ties: Option<bool>,
) -> ModelLayout {
    let places: Vec<(TensorPlace, u64)> = tensors
        .into_iter()
        .map(|(name, bytes)| (classify(name), bytes))
        .collect();
    // The main layer stack is the prefix holding the most bytes.
    let mut prefix_bytes: BTreeMap<&str, u64> = BTreeMap::new();
    for (place, bytes) in &places {
        if let TensorPlace::Layer { prefix, .. } = place {
            *prefix_bytes.entry(prefix.as_str()).or_default() += bytes;
        }
    }
    let layer_prefix = prefix_bytes
        .iter()
        .max_by_key(|(p, b)| (**b, std::cmp::Reverse(**p)))
        .map(|(p, _)| p.to_string());

    let mut embedding = Vec::new();
    let mut layers: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    let mut norm = Vec::new();
    let mut head = Vec::new();
    let mut other = Vec::new();
    let mut notes = Vec::new();
    let mut foreign_layers: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (place, _)) in places.iter().enumerate() {
        match place {
            TensorPlace::Embedding => embedding.push(i),
            TensorPlace::Layer { prefix, index } if Some(prefix) == layer_prefix.as_ref() => {
                layers.entry(*index).or_default().push(i)
            }
            TensorPlace::Layer { prefix, .. } => {
                *foreign_layers.entry(prefix.clone()).or_default() += 1;
                other.push(i)
            }
            TensorPlace::Norm => norm.push(i),
            TensorPlace::Head => head.push(i),
            TensorPlace::Other => other.push(i),
        }
    }
    let bytes_of = |ids: &[usize]| ids.iter().map(|&i| places[i].1).sum::<u64>();
    let mut units = Vec::new();
    let mut push = |name: String, kind: UnitKind, tensors: Vec<usize>| {
        let bytes = bytes_of(&tensors);
        units.push(PlacementUnit {
            name,
            kind,
            tensors,
            bytes,
        });
    };
    let has_embedding = !embedding.is_empty();
    if has_embedding {
        push("embedding".into(), UnitKind::Embedding, embedding);
    }
    let found_layers: Vec<u64> = layers.keys().copied().collect();
    for (index, ids) in layers {
        push(format!("layers.{index}"), UnitKind::Layer(index), ids);
    }
    if !norm.is_empty() {
        push("norm".into(), UnitKind::Norm, norm);
    }
    let tied_embeddings = head.is_empty() && has_embedding && config_ties != Some(false);
    if !head.is_empty() || tied_embeddings {
        push("head".into(), UnitKind::Head, head);
    }
    if !other.is_empty() {
        let n = other.len();
        push("other".into(), UnitKind::Other, other);
        notes.push(format!(
            "{n} tensor(s) match no embedding, layer, norm or head name and are kept in unit \"other\""
        ));
    }
    for (prefix, n) in foreign_layers {
        notes.push(format!(
            "{n} tensor(s) under \"{prefix}\" belong to a second layer stack and are kept in unit \"other\""
        ));
    }
    if let Some(&last) = found_layers.last() {
        let missing: Vec<u64> = (0..=last)
            .filter(|i| found_layers.binary_search(i).is_err())
            .collect();
        if !missing.is_empty() {
            notes.push(format!("decoder layers {missing:?} have no tensors"));
        }
    }
    if let Some(n) = config_layers {
        if n != found_layers.len() as u64 {
            notes.push(format!(
                "config.json says {n} layers but the checkpoint has {}",
                found_layers.len()
            ));
        }
    }
    if has_embedding && config_ties == Some(false) && units.iter().all(|u| u.kind != UnitKind::Head)
    {
        notes.push(
            "config.json says tie_word_embeddings is false but the checkpoint has no head tensor"
                .into(),
        );
    }
    ModelLayout {
        units,
        layer_prefix,
        tied_embeddings,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(layout: &ModelLayout) -> Vec<&str> {
        layout.units.iter().map(|u| u.name.as_str()).collect()
    }

    #[test]
    fn classifies_common_naming_schemes() {
        let layer = |p: &str, i| TensorPlace::Layer {
            prefix: p.into(),
            index: i,
        };
        // Llama, Mistral, Qwen2, Gemma, Phi-3
        assert_eq!(
            classify("model.embed_tokens.weight"),
            TensorPlace::Embedding
        );
        assert_eq!(
            classify("model.layers.7.mlp.up_proj.weight"),
            layer("model.layers", 7)
        );
        assert_eq!(
            classify("model.layers.0.self_attn.qkv_proj.weight"),
            layer("model.layers", 0)
        );
        assert_eq!(classify("model.norm.weight"), TensorPlace::Norm);
        assert_eq!(classify("lm_head.weight"), TensorPlace::Head);
        // Mixtral experts stay in their layer
        assert_eq!(
            classify("model.layers.3.block_sparse_moe.experts.5.w1.weight"),
            layer("model.layers", 3)
        );
        // GPT-2
        assert_eq!(classify("transformer.wte.weight"), TensorPlace::Embedding);
        assert_eq!(classify("transformer.wpe.weight"), TensorPlace::Embedding);
        assert_eq!(
            classify("transformer.h.11.attn.c_attn.weight"),
            layer("transformer.h", 11)
        );
        assert_eq!(classify("transformer.ln_f.bias"), TensorPlace::Norm);
        assert_eq!(classify("h.0.mlp.c_fc.weight"), layer("h", 0));
        // OPT / BART decoders, GPT-NeoX, Falcon, Phi-2
        assert_eq!(
            classify("model.decoder.layers.2.fc1.weight"),
            layer("model.decoder.layers", 2)
        );
        assert_eq!(
            classify("model.decoder.final_layer_norm.weight"),
            TensorPlace::Norm
        );
        assert_eq!(classify("gpt_neox.embed_in.weight"), TensorPlace::Embedding);
        assert_eq!(classify("embed_out.weight"), TensorPlace::Head);
        assert_eq!(classify("model.final_layernorm.weight"), TensorPlace::Norm);
        // Mistral consolidated naming
        assert_eq!(classify("tok_embeddings.weight"), TensorPlace::Embedding);
        assert_eq!(classify("layers.4.attention.wq.weight"), layer("layers", 4));
        assert_eq!(classify("output.weight"), TensorPlace::Head);
        assert_eq!(classify("norm.weight"), TensorPlace::Norm);
        // Unknown
        assert_eq!(classify("model.rotary_emb.inv_freq"), TensorPlace::Other);
        assert_eq!(classify("weight"), TensorPlace::Other);
        assert_eq!(classify(""), TensorPlace::Other);
    }

    #[test]
    fn groups_in_model_order_whatever_the_input_order() {
        let t = [
            ("lm_head.weight", 10),
            ("model.layers.10.mlp.down_proj.weight", 5),
            ("model.norm.weight", 1),
            ("model.layers.2.mlp.down_proj.weight", 5),
            ("model.embed_tokens.weight", 10),
            ("model.layers.2.input_layernorm.weight", 1),
        ];
        let l = group(t, None, Some(false));
        assert_eq!(
            names(&l),
            ["embedding", "layers.2", "layers.10", "norm", "head"]
        );
        assert_eq!(l.units[1].bytes, 6);
        assert_eq!(l.units[1].tensors, vec![3, 5]);
        assert!(!l.tied_embeddings);
        assert!(l
            .notes
            .iter()
            .any(|n| n.contains("[0, 1, 3, 4, 5, 6, 7, 8, 9]")));
    }

    #[test]
    fn tied_head_is_a_zero_byte_unit() {
        let t = [
            ("transformer.wte.weight", 100),
            ("transformer.h.0.attn.c_attn.weight", 30),
            ("transformer.ln_f.weight", 1),
        ];
        let l = group(t, Some(1), None);
        assert!(l.tied_embeddings);
        assert_eq!(names(&l), ["embedding", "layers.0", "norm", "head"]);
        assert_eq!(l.units[3].bytes, 0);
        assert_eq!(l.total_bytes(), 131);
        assert!(l.notes.is_empty(), "{:?}", l.notes);
    }

    #[test]
    fn unknown_tensors_are_kept_in_other_and_reported() {
        let t = [
            ("model.embed_tokens.weight", 4),
            ("model.layers.0.x.weight", 4),
            ("vision_tower.encoder.layers.0.fc.weight", 2),
            ("vision_tower.encoder.layers.1.fc.weight", 2),
            ("multi_modal_projector.linear.weight", 1),
        ];
        let l = group(t, Some(2), Some(true));
        assert_eq!(l.layer_prefix.as_deref(), Some("model.layers"));
        let other = l.units.iter().find(|u| u.name == "other").unwrap();
        assert_eq!(other.tensors, vec![2, 3, 4]);
        assert_eq!(l.total_bytes(), 13);
        assert_eq!(l.notes.len(), 3, "{:?}", l.notes);
        assert!(l.notes[2].contains("config.json says 2 layers but the checkpoint has 1"));
    }
}
