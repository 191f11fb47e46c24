//! `weightsmith`: the façade over the weightsmith crates, and the `weightsmith` CLI.
//!
//! The library wires `st-io`, `planner`, `gpu-mem`, `lora-kernels` and `hub-publish` into the
//! five verbs (inspect, plan, load, merge, publish); each verb is a function returning a
//! serialisable report, so a program gets exactly what the CLI prints. The CLI
//! (`--features cli`, on by default) adds argument parsing and printing only.
//!
//! The verbs: [`inspect()`], [`plan_checkpoint`], [`load()`], [`merge()`] and [`publish()`].

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
pub use load::{load, LoadOptions, LoadReport, LoadedModel, LoadedQuantizedLinear};
pub use merge::{merge, MergeDevice, MergeOptions, MergeReport};
pub use plan::{plan_checkpoint, PlanOptions, PlanReport};
pub use publish::{publish, PublishOptions, PublishSummary};
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
