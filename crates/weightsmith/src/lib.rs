//! `weightsmith`: the façade over the weightsmith crates, and the `weightsmith` CLI.
//!
//! The library wires `st-io`, `planner`, `gpu-mem`, `lora-kernels` and `hub-publish` into the
//! five verbs (inspect, plan, load, merge, publish); each verb is a function returning a
//! serialisable report, so a program gets exactly what the CLI prints. The CLI
//! (`--features cli`, on by default) adds argument parsing and printing only.
//!
//! The verbs: [`inspect()`], [`plan_checkpoint`], [`load()`], [`merge()`] and [`publish()`].
//!
//! Depend on it with `default-features = false` to leave the CLI's dependencies out. On the
//! checkpoint and adapter that ship in the repository:
//!
//! ```
//! use weightsmith::plan::{DeviceChoice, SplitChoice};
//! use weightsmith::{inspect, load, merge, plan_checkpoint, InspectOptions, LoadOptions, MergeDevice,
//!     MergeOptions, PlanOptions};
//! # let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
//! let base = format!("{root}/fixtures/models/tiny-llama");
//! let adapter = format!("{root}/fixtures/adapters/llama-lora/adapter");
//!
//! // inspect: headers, units, problems (a path or a Hub id).
//! let report = inspect(&base, &InspectOptions::default())?;
//! assert_eq!(report.tensor_count, 30);
//!
//! // plan: two simulated 1 GiB GPUs, balanced.
//! let options = PlanOptions {
//!     devices: DeviceChoice::Simulated(vec![1 << 30, 1 << 30]),
//!     split: SplitChoice::Balanced,
//!     ..PlanOptions::default()
//! };
//! let plan = plan_checkpoint(&base, &options)?;
//! assert_eq!(plan.plan.layers_per_device(), vec![2, 1]);
//!
//! // merge: a standalone 16-bit checkpoint, written whole or not at all.
//! let out = tempfile::tempdir()?;
//! let mut options = MergeOptions::new(vec![(adapter.into(), 1.0)], out.path().join("merged"));
//! options.device = MergeDevice::Cpu;
//! let merged = merge(&base, &options, &mut |_progress| {})?;
//! assert_eq!(merged.tensors_written, 30);
//!
//! // load: into host memory here (onto the GPUs where there are some).
//! let options = LoadOptions { host_only: true, ..LoadOptions::default() };
//! let model = load(out.path().join("merged"), &options, &mut |_progress| {})?;
//! let embed = model.tensor("model.embed_tokens.weight").expect("loaded");
//! assert_eq!(embed.shape, [256, 64]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod card;
#[cfg(feature = "cli")]
pub mod cli;
pub mod device_map;
pub mod inspect;
pub mod load;
pub mod merge;
mod param_lora;
pub mod plan;
pub mod publish;
pub mod source;

pub use device_map::DeviceMap;
pub use inspect::{inspect, InspectOptions, InspectReport};
pub use load::{
    load, LoadOptions, LoadPhases, LoadProgress, LoadReport, LoadStage, LoadedModel,
    LoadedQuantizedLinear, LOAD_SCHEMA_VERSION,
};
pub use merge::{merge, MergeDevice, MergeOptions, MergeReport};
pub use plan::{plan_checkpoint, PlanOptions, PlanReport};
pub use publish::{publish, PublishOptions, PublishSummary, PUBLISH_SUMMARY_SCHEMA_VERSION};
pub use {gpu_mem, hub_publish, lora_kernels, planner, st_io};

/// The errors of the façade: one variant per crate it wraps.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Checkpoint(#[from] st_io::Error),
    #[error(transparent)]
    Plan(#[from] planner::Error),
    #[error(transparent)]
    Kernel(#[from] lora_kernels::Error),
    #[error(transparent)]
    Gpu(#[from] gpu_mem::Error),
    #[error(transparent)]
    Publish(#[from] hub_publish::Error),
    /// A failure while loading, with what was being loaded where. Everything allocated so far
    /// has been freed.
    #[error("loading {unit} onto {device}: {message}")]
    Load {
        unit: String,
        device: String,
        message: String,
    },
    /// The arithmetic of one tensor's merge failed (a non-finite result, a GPU error); nothing
    /// was left behind.
    #[error("merging \"{tensor}\": {source}")]
    Merge {
        tensor: String,
        #[source]
        source: lora_kernels::Error,
    },
    /// The caller cancelled (Ctrl-C in the CLI) before the output was complete; nothing was
    /// left behind.
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// Options that do not go together, or input the verb cannot use.
    #[error("{0}")]
    Usage(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
