//! The README model card written beside a merged checkpoint.

use std::fmt::Write as _;

use st_io::Dtype;

use crate::merge::AdapterSummary;

/// What the card says.
pub struct CardFacts<'a> {
    pub base_model: String,
    pub adapters: &'a [AdapterSummary],
    pub dtype: Dtype,
    pub license: Option<String>,
}

/// A Hugging Face model card: YAML front matter (base_model, relation, library, tags) and a
/// body saying how the model was made and how to load it.
pub fn model_card(f: &CardFacts) -> String {
    let mut s = String::from("---\n");
    let _ = writeln!(s, "base_model: {}", yaml_string(&f.base_model));
    let _ = writeln!(s, "base_model_relation: merge");
    let _ = writeln!(s, "library_name: transformers");
    if let Some(l) = &f.license {
        let _ = writeln!(s, "license: {}", yaml_string(l));
    }
    s.push_str("tags:\n- merge\n- lora\n- weightsmith\n---\n\n");
    let _ = writeln!(s, "# Merged model\n");
    let _ = writeln!(
        s,
        "This checkpoint is `{}` with {} LoRA adapter(s) merged into its weights by weightsmith {}, saved in {}. It loads with plain transformers; PEFT is not needed.\n",
        f.base_model,
        f.adapters.len(),
        env!("CARGO_PKG_VERSION"),
        if f.dtype == Dtype::F16 { "float16" } else { "bfloat16" }
    );
    s.push_str("| adapter | weight | r | alpha | scaling | DoRA | modules |\n|---|---|---|---|---|---|---|\n");
    for a in f.adapters {
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
    s.push_str("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\nmodel = AutoModelForCausalLM.from_pretrained(\"PATH_OR_REPO\")\ntokenizer = AutoTokenizer.from_pretrained(\"PATH_OR_REPO\")\n```\n");
    s
}

fn yaml_string(v: &str) -> String {
    serde_json::Value::String(v.to_string()).to_string()
}
