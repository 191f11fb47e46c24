//! `weightsmith`: the façade over the weightsmith crates, and the `weightsmith` CLI.
//!
//! The library wires `st-io`, `planner`, `gpu-mem`, `lora-kernels` and `hub-publish` into the
//! five verbs (inspect, plan, load, merge, publish); each verb is a function returning a
//! serialisable report, so a program gets exactly what the CLI prints. The CLI
//! (`--features cli`, on by default) adds argument parsing and printing only.
//!
//! Available now: [`inspect()`]. The other verbs land with their issues.

pub mod inspect;

pub use inspect::{inspect, InspectOptions, InspectReport};
pub use st_io;

/// The errors of the façade: one variant per crate it wraps.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Checkpoint(#[from] st_io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
