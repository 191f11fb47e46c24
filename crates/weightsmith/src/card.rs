//! The README model card written beside a merged checkpoint (rendered by `hub-publish`, so a
//! merged folder and a published one carry the same card).

use std::path::Path;

use hub_publish::card::looks_like_repo_id;
use hub_publish::{BaseFacts, CardAdapter, ModelCard};
use st_io::Dtype;

use crate::merge::AdapterSummary;

/// The card of a merge: base model (when it is a Hub id: a local path is not valid metadata),
/// license and pipeline tag from the base's own card and config, the adapters, the dtype.
pub fn merge_card(
    base_folder: &Path,
    adapter_base_model: Option<&str>,
    adapters: &[AdapterSummary],
    dtype: Dtype,
) -> String {
    let facts = BaseFacts::from_folder(base_folder);
    let base_model = adapter_base_model
        .filter(|b| looks_like_repo_id(b))
        .map(str::to_string)
        .or(facts.base_model);
    ModelCard {
        base_model_relation: base_model.as_ref().map(|_| "merge".to_string()),
        base_model,
        license: facts.license,
        pipeline_tag: facts.pipeline_tag,
        tags: vec!["merge".into(), "lora".into(), "weightsmith".into()],
        repo_id: None,
        adapters: adapters
            .iter()
            .map(|a| CardAdapter {
                path: a.path.clone(),
                weight: a.weight,
                r: a.r,
                lora_alpha: a.lora_alpha,
                use_rslora: a.use_rslora,
                use_dora: a.use_dora,
                modules: a.modules,
            })
            .collect(),
        dtype: Some(
            if dtype == Dtype::F16 {
                "float16"
            } else {
                "bfloat16"
            }
            .into(),
        ),
        architecture: facts.architecture,
        tool: format!("weightsmith {}", env!("CARGO_PKG_VERSION")),
    }
    .render()
}
