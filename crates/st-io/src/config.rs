//! The facts of a Hugging Face `config.json` that placement, loading and merging need.

use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The kind of quantisation a `quantization_config` declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "method")]
pub enum QuantKind {
    Gptq,
    Awq,
    Exl2,
    Bitsandbytes,
    /// Any other `quant_method`, kept verbatim.
    Other(String),
}

/// `quantization_config`, summarised; the whole object stays in [`ModelConfig::raw`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantizationConfig {
    #[serde(flatten)]
    pub kind: QuantKind,
    /// Bits per weight: an integer for GPTQ/AWQ, possibly fractional for EXL2 (`4.65`).
    pub bits: Option<f64>,
    /// Input rows per group of scales; -1 means one group per column.
    pub group_size: Option<i64>,
    /// GPTQ act-order (`desc_act`): groups are assigned through `g_idx`, not by row.
    pub desc_act: Option<bool>,
    /// GPTQ symmetric quantisation (every zero point at the middle of the range).
    pub sym: Option<bool>,
    /// GPTQ `checkpoint_format`: `gptq` (zero points stored minus one, the AutoGPTQ layout)
    /// or `gptq_v2` (stored as they are, GPTQModel's internal layout).
    pub checkpoint_format: Option<String>,
    /// GPTQModel's `dynamic`: per-module overrides of bits and group size are declared.
    pub dynamic: bool,
}

/// What weightsmith reads from `config.json`. Names follow transformers; the GPT-2 style
/// aliases (`n_layer`, `n_embd`, `n_head`, …) are read too, and fields of a nested
/// `text_config` (multimodal models) are used when the top level lacks them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
    pub num_hidden_layers: Option<u64>,
    pub hidden_size: Option<u64>,
    pub intermediate_size: Option<u64>,
    pub num_attention_heads: Option<u64>,
    /// As written; [`ModelConfig::kv_heads`] applies the default (= attention heads).
    pub num_key_value_heads: Option<u64>,
    /// As written; [`ModelConfig::head_dim`] applies the default (= hidden / heads).
    pub head_dim: Option<u64>,
    pub vocab_size: Option<u64>,
    pub max_position_embeddings: Option<u64>,
    /// As written; transformers' default when absent is `true`.
    pub tie_word_embeddings: Option<bool>,
    /// `torch_dtype` (transformers 4) or `dtype` (transformers 5).
    pub torch_dtype: Option<String>,
    /// The attention window when sliding-window attention is in use (`None` when the field is
    /// null, absent, or disabled by `use_sliding_window: false`).
    pub sliding_window: Option<u64>,
    /// Per-layer attention kinds (`layer_types`: "sliding_attention", "full_attention"), when
    /// the config lists them.
    pub layer_types: Option<Vec<String>>,
    pub quantization: Option<QuantizationConfig>,
    /// Whether the facts came from a nested `text_config`.
    pub from_text_config: bool,
    /// The whole document, for writing an updated copy.
    #[serde(skip)]
    pub raw: Value,
}

impl ModelConfig {
    /// Parses `config.json` bytes; `file` names the file in errors.
    pub fn parse(file: &Path, bytes: &[u8]) -> Result<ModelConfig> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| Error::BadConfig {
            file: file.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(top) = &raw else {
            return Err(Error::BadConfig {
                file: file.to_path_buf(),
                message: "must be a JSON object".into(),
            });
        };
        let text = match top.get("text_config") {
            Some(Value::Object(t)) => Some(t),
            Some(Value::Null) | None => None,
            Some(_) => {
                return Err(field_error(file, "text_config", "must be an object"));
            }
        };
        let reader = Reader { file, top, text };
        let layers = reader.uint(&["num_hidden_layers", "n_layer", "num_layers", "n_layers"])?;
        let from_text_config = layers.1;
        let use_sliding = reader.boolean(&["use_sliding_window"])?.0;
        let sliding_window = match use_sliding {
            Some(false) => None,
            _ => reader.uint(&["sliding_window"])?.0,
        };
        let quantization = match top.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(Value::Object(q)) => Some(quantization(file, q)?),
            Some(_) => {
                return Err(field_error(
                    file,
                    "quantization_config",
                    "must be an object",
                ))
            }
        };
        Ok(ModelConfig {
            architectures: reader.strings("architectures")?.unwrap_or_default(),
            model_type: reader.string(&["model_type"])?.0,
            num_hidden_layers: layers.0,
            hidden_size: reader.uint(&["hidden_size", "n_embd", "d_model"])?.0,
            intermediate_size: reader.uint(&["intermediate_size", "n_inner", "ffn_dim"])?.0,
            num_attention_heads: reader
                .uint(&["num_attention_heads", "n_head", "num_heads"])?
                .0,
            num_key_value_heads: reader
                .uint(&[
                    "num_key_value_heads",
                    "num_kv_heads",
                    "multi_query_group_num",
                ])?
                .0,
            head_dim: reader.uint(&["head_dim", "kv_channels"])?.0,
            vocab_size: reader.uint(&["vocab_size"])?.0,
            max_position_embeddings: reader
                .uint(&["max_position_embeddings", "n_positions", "seq_length"])?
                .0,
            tie_word_embeddings: reader.boolean(&["tie_word_embeddings"])?.0,
            torch_dtype: reader.string(&["torch_dtype", "dtype"])?.0,
            sliding_window,
            layer_types: reader.strings("layer_types")?,
            quantization,
            from_text_config,
            raw,
        })
    }

    /// Reads and parses a `config.json` file.
    pub fn read(file: &Path) -> Result<ModelConfig> {
        let bytes = crate::paths::read_regular(file)?;
        ModelConfig::parse(file, &bytes)
    }

    /// Key/value heads: `num_key_value_heads`, or the attention heads when absent (no GQA).
    pub fn kv_heads(&self) -> Option<u64> {
        self.num_key_value_heads.or(self.num_attention_heads)
    }

    /// Per-head dimension: `head_dim`, or hidden size / attention heads.
    pub fn head_dim(&self) -> Option<u64> {
        self.head_dim
            .or_else(|| match (self.hidden_size, self.num_attention_heads) {
                (Some(h), Some(n)) if n > 0 => Some(h / n),
                _ => None,
            })
    }
}

fn field_error(file: &Path, field: &str, message: &str) -> Error {
    Error::BadConfigField {
        file: file.to_path_buf(),
        field: field.to_string(),
        message: message.to_string(),
    }
}

/// Looks fields up at the top level, then in `text_config`; `.1` says which one answered.
struct Reader<'a> {
    file: &'a Path,
    top: &'a Map<String, Value>,
    text: Option<&'a Map<String, Value>>,
}

impl<'a> Reader<'a> {
    fn find(&self, names: &[&str]) -> Option<(&'a str, &'a Value, bool)> {
        let lookup = |map: &'a Map<String, Value>| {
            names
                .iter()
                .find_map(|n| map.get_key_value(*n).map(|(k, v)| (k.as_str(), v)))
        };
        if let Some((k, v)) = lookup(self.top) {
            return Some((k, v, false));
        }
        self.text.and_then(lookup).map(|(k, v)| (k, v, true))
    }

    fn uint(&self, names: &[&str]) -> Result<(Option<u64>, bool)> {
        match self.find(names) {
            None => Ok((None, false)),
            Some((_, Value::Null, nested)) => Ok((None, nested)),
            Some((k, v, nested)) => match v.as_u64() {
                Some(n) => Ok((Some(n), nested)),
                None => Err(field_error(
                    self.file,
                    k,
                    &format!("expected a non-negative integer, found {v}"),
                )),
            },
        }
    }

    fn boolean(&self, names: &[&str]) -> Result<(Option<bool>, bool)> {
        match self.find(names) {
            None => Ok((None, false)),
            Some((_, Value::Null, nested)) => Ok((None, nested)),
            Some((_, Value::Bool(b), nested)) => Ok((Some(*b), nested)),
            Some((k, v, _)) => Err(field_error(
                self.file,
                k,
                &format!("expected true or false, found {v}"),
            )),
        }
    }

    fn string(&self, names: &[&str]) -> Result<(Option<String>, bool)> {
        match self.find(names) {
            None => Ok((None, false)),
            Some((_, Value::Null, nested)) => Ok((None, nested)),
            Some((_, Value::String(s), nested)) => Ok((Some(s.clone()), nested)),
            Some((k, v, _)) => Err(field_error(
                self.file,
                k,
                &format!("expected a string, found {v}"),
            )),
        }
    }

    fn strings(&self, name: &str) -> Result<Option<Vec<String>>> {
        match self.find(&[name]) {
            None | Some((_, Value::Null, _)) => Ok(None),
            Some((k, Value::Array(items), _)) => items
                .iter()
                .map(|i| {
                    i.as_str().map(str::to_string).ok_or_else(|| {
                        field_error(self.file, k, &format!("expected strings, found {i}"))
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some((k, v, _)) => Err(field_error(
                self.file,
                k,
                &format!("expected a list of strings, found {v}"),
            )),
        }
    }
}

fn quantization(file: &Path, q: &Map<String, Value>) -> Result<QuantizationConfig> {
    let method = match q.get("quant_method") {
        Some(Value::String(s)) => Some(s.to_ascii_lowercase()),
        None | Some(Value::Null) => None,
        Some(v) => {
            return Err(field_error(
                file,
                "quantization_config.quant_method",
                &format!("expected a string, found {v}"),
            ))
        }
    };
    let bnb_flags = ["load_in_4bit", "load_in_8bit"]
        .iter()
        .any(|k| q.get(*k) == Some(&Value::Bool(true)));
    let kind = match method.as_deref() {
        Some("gptq") => QuantKind::Gptq,
        Some("awq") => QuantKind::Awq,
        Some("exl2") => QuantKind::Exl2,
        Some("bitsandbytes") => QuantKind::Bitsandbytes,
        Some(other) => QuantKind::Other(other.to_string()),
        None if bnb_flags => QuantKind::Bitsandbytes,
        None => QuantKind::Other("unknown".to_string()),
    };
    let int_field = |key: &str| -> Result<Option<i64>> {
        match q.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                field_error(
                    file,
                    &format!("quantization_config.{key}"),
                    &format!("expected an integer, found {v}"),
                )
            }),
        }
    };
    let bits = match q.get("bits") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(b) if b > 0.0 && b <= 64.0 => Some(b),
            _ => {
                return Err(field_error(
                    file,
                    "quantization_config.bits",
                    &format!("expected a positive number of bits, found {v}"),
                ))
            }
        },
    };
    let bool_field = |key: &str| -> Result<Option<bool>> {
        match q.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(field_error(
                file,
                &format!("quantization_config.{key}"),
                &format!("expected true or false, found {v}"),
            )),
        }
    };
    let checkpoint_format = match q.get("checkpoint_format") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.to_ascii_lowercase()),
        Some(v) => {
            return Err(field_error(
                file,
                "quantization_config.checkpoint_format",
                &format!("expected a string, found {v}"),
            ))
        }
    };
    let dynamic = matches!(q.get("dynamic"), Some(Value::Object(m)) if !m.is_empty());
    Ok(QuantizationConfig {
        kind,
        bits,
        group_size: int_field("group_size")?,
        desc_act: bool_field("desc_act")?,
        sym: bool_field("sym")?,
        checkpoint_format,
        dynamic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig> {
        ModelConfig::parse(Path::new("config.json"), s.as_bytes())
    }

    #[test]
    fn reads_llama_fields_and_defaults() {
        let c = parse(
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","num_hidden_layers":32,
            "hidden_size":4096,"num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,
            "tie_word_embeddings":false,"torch_dtype":"bfloat16","sliding_window":null}"#,
        )
        .unwrap();
        assert_eq!(c.num_hidden_layers, Some(32));
        assert_eq!(c.kv_heads(), Some(8));
        assert_eq!(c.head_dim(), Some(128));
        assert_eq!(c.sliding_window, None);
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn reads_gpt2_aliases() {
        let c = parse(r#"{"model_type":"gpt2","n_layer":12,"n_embd":768,"n_head":12}"#).unwrap();
        assert_eq!(c.num_hidden_layers, Some(12));
        assert_eq!(c.kv_heads(), Some(12));
        assert_eq!(c.head_dim(), Some(64));
    }

    #[test]
    fn qwen2_disabled_sliding_window_is_none() {
        let c = parse(r#"{"sliding_window":4096,"use_sliding_window":false}"#).unwrap();
        assert_eq!(c.sliding_window, None);
        let c = parse(r#"{"sliding_window":4096}"#).unwrap();
        assert_eq!(c.sliding_window, Some(4096));
    }

    #[test]
    fn reads_text_config_of_multimodal_models() {
        let c =
            parse(r#"{"text_config":{"num_hidden_layers":4,"hidden_size":64},"dtype":"float16"}"#)
                .unwrap();
        assert!(c.from_text_config);
        assert_eq!(c.num_hidden_layers, Some(4));
        assert_eq!(c.torch_dtype.as_deref(), Some("float16"));
    }

    #[test]
    fn records_quantization_kind() {
        let c =
            parse(r#"{"quantization_config":{"quant_method":"gptq","bits":4,"group_size":128}}"#)
                .unwrap();
        let q = c.quantization.unwrap();
        assert_eq!(q.kind, QuantKind::Gptq);
        assert_eq!((q.bits, q.group_size), (Some(4.0), Some(128)));
        let c =
            parse(r#"{"quantization_config":{"quant_method":"exl2","bits":4.65,"head_bits":6}}"#)
                .unwrap();
        let q = c.quantization.unwrap();
        assert_eq!((q.kind, q.bits), (QuantKind::Exl2, Some(4.65)));
        let c = parse(
            r#"{"quantization_config":{"quant_method":"gptq","bits":3,"desc_act":true,"sym":false,"checkpoint_format":"gptq_v2"}}"#,
        )
        .unwrap();
        let q = c.quantization.unwrap();
        assert_eq!((q.desc_act, q.sym), (Some(true), Some(false)));
        assert_eq!(q.checkpoint_format.as_deref(), Some("gptq_v2"));
        let c = parse(r#"{"quantization_config":{"load_in_4bit":true}}"#).unwrap();
        assert_eq!(c.quantization.unwrap().kind, QuantKind::Bitsandbytes);
        let c = parse(r#"{"quantization_config":{"quant_method":"fp8"}}"#).unwrap();
        assert_eq!(c.quantization.unwrap().kind, QuantKind::Other("fp8".into()));
    }

    #[test]
    fn rejects_malformed_json_naming_the_file() {
        let e = parse("{\"num_hidden_layers\": 3,").unwrap_err().to_string();
        assert!(e.starts_with("config.json: not valid JSON"), "{e}");
        let e = parse("[1,2]").unwrap_err().to_string();
        assert_eq!(e, "config.json: must be a JSON object");
    }

    #[test]
    fn rejects_wrong_field_types_naming_the_field() {
        let e = parse(r#"{"num_hidden_layers":"32"}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config.json: field \"num_hidden_layers\": expected a non-negative integer, found \"32\""
        );
        let e = parse(r#"{"tie_word_embeddings":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"tie_word_embeddings\""), "{e}");
        let e = parse(r#"{"quantization_config":{"bits":"4"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("quantization_config.bits"), "{e}");
        let e = parse(r#"{"quantization_config":{"desc_act":"yes"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("quantization_config.desc_act"), "{e}");
        let e = parse(r#"{"architectures":"Llama"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"architectures\""), "{e}");
    }
}
