//! Model cards: the README.md with YAML front matter that the Hub reads (base_model,
//! base_model_relation, library_name, license, pipeline_tag, tags) and a body that says how the
//! model was made and how to load it.

use std::fmt::Write as _;
use std::path::Path;

/// Where the repository id goes in a card written before the repository is known (by
/// `weightsmith merge`); `publish` puts the real id there in what it uploads.
pub const REPO_PLACEHOLDER: &str = "PATH_OR_REPO";

/// One merged adapter, as the card lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct CardAdapter {
    pub path: String,
    pub weight: f64,
    pub r: u64,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub modules: usize,
}

/// What a card says. Unknown fields are left out of the front matter, never guessed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelCard {
    pub base_model: Option<String>,
    /// `merge`, `finetune`, `adapter` or `quantized` (the Hub's model-tree relations).
    pub base_model_relation: Option<String>,
    pub license: Option<String>,
    pub pipeline_tag: Option<String>,
    pub tags: Vec<String>,
    /// The repository id for the usage snippet; [`REPO_PLACEHOLDER`] when `None`.
    pub repo_id: Option<String>,
    pub adapters: Vec<CardAdapter>,
    /// `bfloat16`, `float16`, ...
    pub dtype: Option<String>,
    pub architecture: Option<String>,
    /// The tool and its version that made the weights.
    pub tool: String,
}

/// Facts taken from a base model's folder: license and pipeline tag from its README front
/// matter, the architecture and the pipeline tag it implies from config.json.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BaseFacts {
    pub license: Option<String>,
    pub pipeline_tag: Option<String>,
    pub base_model: Option<String>,
    pub architecture: Option<String>,
    pub dtype: Option<String>,
}

impl BaseFacts {
    /// Reads `README.md` and `config.json` of a model folder; absent or unreadable files give
    /// no facts (a card is best effort, never a reason to fail).
    pub fn from_folder(folder: &Path) -> BaseFacts {
        let mut facts = BaseFacts::default();
        if let Ok(readme) = std::fs::read_to_string(folder.join("README.md")) {
            let fm = front_matter(&readme);
            facts.license = fm_value(fm, "license");
            facts.pipeline_tag = fm_value(fm, "pipeline_tag");
            facts.base_model = fm_value(fm, "base_model");
        }
        if let Ok(text) = std::fs::read_to_string(folder.join("config.json")) {
            if let Ok(cfg) = serde_json::from_str::<serde_json::Value>(&text) {
                let cfg_text = cfg.get("text_config").unwrap_or(&cfg);
                facts.architecture = cfg
                    .get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(|a| a.as_str())
                    .map(str::to_string);
                facts.dtype = cfg
                    .get("torch_dtype")
                    .or_else(|| cfg.get("dtype"))
                    .or_else(|| cfg_text.get("torch_dtype"))
                    .and_then(|d| d.as_str())
                    .map(str::to_string);
                if facts.pipeline_tag.is_none() {
                    facts.pipeline_tag = facts.architecture.as_deref().and_then(pipeline_for);
                }
                if facts.base_model.is_none() {
                    facts.base_model = cfg
                        .get("_name_or_path")
                        .and_then(|n| n.as_str())
                        .filter(|n| looks_like_repo_id(n))
                        .map(str::to_string);
                }
            }
        }
        facts
    }
}

/// The pipeline tag transformers' architecture name implies.
pub fn pipeline_for(architecture: &str) -> Option<String> {
    let tag = if architecture.ends_with("ForCausalLM") || architecture.ends_with("LMHeadModel") {
        "text-generation"
    } else if architecture.ends_with("ForConditionalGeneration") {
        "image-text-to-text"
    } else if architecture.ends_with("ForSequenceClassification") {
        "text-classification"
    } else if architecture.ends_with("ForTokenClassification") {
        "token-classification"
    } else {
        return None;
    };
    Some(tag.to_string())
}

/// `owner/name` with Hub-legal characters, not a local path.
pub fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.ends_with('.')
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(a) && ok(b)
}

/// The YAML front matter of a card (between the first two `---` lines), or "".
pub fn front_matter(card: &str) -> &str {
    let Some(rest) = card
        .strip_prefix("---\n")
        .or_else(|| card.strip_prefix("---\r\n"))
    else {
        return "";
    };
    match rest.find("\n---") {
        Some(end) => &rest[..end + 1],
        None => "",
    }
}

/// `card` with `base_model` set in its front matter (the line replaced, or added; a card with
/// no front matter gets one), everything else kept as it was.
pub fn with_base_model(card: &str, base_model: &str) -> String {
    let line = format!("base_model: \"{}\"", base_model.replace('"', ""));
    let fm = front_matter(card);
    if fm.is_empty() {
        return format!("---\n{line}\n---\n{card}");
    }
    let start = card.find(fm).unwrap_or(0);
    let mut lines: Vec<String> = Vec::new();
    let mut replaced = false;
    let mut in_list = false;
    for l in fm.lines() {
        if l.starts_with("base_model:") {
            lines.push(line.clone());
            replaced = true;
            // A list value (`base_model:` then `- id` lines) is replaced whole.
            in_list = l.trim_end() == "base_model:";
            continue;
        }
        if in_list && (l.starts_with("- ") || l.starts_with("  ")) {
            continue;
        }
        in_list = false;
        lines.push(l.to_string());
    }
    if !replaced {
        lines.insert(0, line);
    }
    let mut new_fm = lines.join("\n");
    new_fm.push('\n');
    format!("{}{new_fm}{}", &card[..start], &card[start + fm.len()..])
}

/// A top-level scalar of simple front matter (`key: value`, quoted or not).
fn fm_value(front_matter: &str, key: &str) -> Option<String> {
    front_matter.lines().find_map(|line| {
        let v = line.strip_prefix(key)?.strip_prefix(':')?.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        (!v.is_empty()).then(|| v.to_string())
    })
}

impl ModelCard {
    /// The card's Markdown.
    pub fn render(&self) -> String {
        let mut s = String::from("---\n");
        if let Some(b) = &self.base_model {
            let _ = writeln!(s, "base_model: {}", yaml_string(b));
            if let Some(r) = &self.base_model_relation {
                let _ = writeln!(s, "base_model_relation: {r}");
            }
        }
        s.push_str("library_name: transformers\n");
        if let Some(l) = &self.license {
            let _ = writeln!(s, "license: {}", yaml_string(l));
        }
        if let Some(p) = &self.pipeline_tag {
            let _ = writeln!(s, "pipeline_tag: {p}");
        }
        if !self.tags.is_empty() {
            s.push_str("tags:\n");
            for t in &self.tags {
                let _ = writeln!(s, "- {}", yaml_string(t));
            }
        }
        s.push_str("---\n\n");
        let repo = self.repo_id.as_deref().unwrap_or(REPO_PLACEHOLDER);
        let title = repo.rsplit('/').next().unwrap_or(repo);
        let _ = writeln!(s, "# {title}\n");
        let dtype = self.dtype.as_deref().unwrap_or("16-bit");
        if self.adapters.is_empty() {
            let _ = write!(s, "A {dtype} checkpoint");
            if let Some(a) = &self.architecture {
                let _ = write!(s, " of a `{a}` model");
            }
            if let Some(b) = &self.base_model {
                let _ = write!(s, " derived from [`{b}`](https://huggingface.co/{b})");
            }
            let _ = writeln!(s, ", published with {}.\n", self.tool);
        } else {
            let base = self.base_model.as_deref().unwrap_or("the base model");
            let _ = writeln!(
                s,
                "`{base}` with {} LoRA adapter(s) merged into its weights by {}, saved in {dtype}. \
                 It loads with plain transformers; PEFT is not needed.\n",
                self.adapters.len(),
                self.tool,
            );
            s.push_str("| adapter | weight | r | alpha | scaling | DoRA | modules |\n");
            s.push_str("|---|---|---|---|---|---|---|\n");
            for a in &self.adapters {
                let scaling = if a.use_rslora {
                    "alpha/√r (rsLoRA)"
                } else {
                    "alpha/r"
                };
                let _ = writeln!(
                    s,
                    "| `{}` | {} | {} | {} | {} | {} | {} |",
                    a.path,
                    a.weight,
                    a.r,
                    a.lora_alpha,
                    scaling,
                    if a.use_dora { "yes" } else { "no" },
                    a.modules
                );
            }
            s.push_str(
                "\nEach weight is `W + Σ weight·scaling·B·A`, accumulated in float32 and rounded once.\n\n",
            );
        }
        let _ = writeln!(
            s,
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
             model = AutoModelForCausalLM.from_pretrained(\"{repo}\")\n\
             tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")\n```"
        );
        s
    }
}

fn yaml_string(v: &str) -> String {
    serde_json::Value::String(v.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_has_the_hub_fields() {
        let card = ModelCard {
            base_model: Some("meta-llama/Llama-3.1-8B".into()),
            base_model_relation: Some("merge".into()),
            license: Some("llama3.1".into()),
            pipeline_tag: Some("text-generation".into()),
            tags: vec!["merge".into(), "lora".into(), "weightsmith".into()],
            repo_id: Some("me/merged".into()),
            adapters: vec![CardAdapter {
                path: "a".into(),
                weight: 1.0,
                r: 16,
                lora_alpha: 32.0,
                use_rslora: false,
                use_dora: false,
                modules: 7,
            }],
            dtype: Some("bfloat16".into()),
            architecture: None,
            tool: "weightsmith 0.1.0".into(),
        }
        .render();
        let fm = front_matter(&card);
        assert!(
            fm.contains("base_model: \"meta-llama/Llama-3.1-8B\"\n"),
            "{fm}"
        );
        assert!(fm.contains("base_model_relation: merge\n"));
        assert!(fm.contains("library_name: transformers\n"));
        assert!(fm.contains("license: \"llama3.1\"\n"));
        assert!(fm.contains("pipeline_tag: text-generation\n"));
        assert!(fm.contains("- \"weightsmith\"\n"));
        assert!(card.contains("from_pretrained(\"me/merged\")"));
        assert!(card.contains("| `a` | 1 | 16 | 32 | alpha/r | no | 7 |"));
        assert_eq!(fm_value(fm, "license").as_deref(), Some("llama3.1"));
    }

    #[test]
    fn repo_ids_are_told_from_paths() {
        assert!(looks_like_repo_id("meta-llama/Llama-3.1-8B"));
        assert!(!looks_like_repo_id("/data/models/llama"));
        assert!(!looks_like_repo_id("../x/y"));
        assert!(!looks_like_repo_id("models/a/b"));
        assert!(!looks_like_repo_id("a"));
        assert_eq!(
            pipeline_for("LlamaForCausalLM").as_deref(),
            Some("text-generation")
        );
        assert_eq!(pipeline_for("Foo"), None);
    }
}

#[cfg(test)]
mod base_model_tests {
    use super::*;

    #[test]
    fn base_model_is_set_in_an_existing_card_and_the_rest_kept() {
        let card = "---\nlicense: mit\nbase_model: old/one\ntags:\n- merge\n---\n# Title\nbody\n";
        let out = with_base_model(card, "new/base");
        assert_eq!(
            out,
            "---\nlicense: mit\nbase_model: \"new/base\"\ntags:\n- merge\n---\n# Title\nbody\n"
        );
        let listed = "---\nbase_model:\n- a/b\n- c/d\nlicense: mit\n---\nx\n";
        assert_eq!(
            with_base_model(listed, "e/f"),
            "---\nbase_model: \"e/f\"\nlicense: mit\n---\nx\n"
        );
        let none = "---\nlicense: mit\n---\nx\n";
        assert_eq!(
            with_base_model(none, "e/f"),
            "---\nbase_model: \"e/f\"\nlicense: mit\n---\nx\n"
        );
        assert_eq!(
            with_base_model("# plain\n", "e/f"),
            "---\nbase_model: \"e/f\"\n---\n# plain\n"
        );
    }
}
