//! `planner`: which device each placement unit (embedding, decoder layer, norm, head) and its
//! KV cache goes to.
//!
//! A pure function from (model layout, devices, policy) to a plan: no I/O, no CUDA, no clocks,
//! no randomness, so every decision is property-tested. The algorithm is the subject of the
//! planner issue; until it lands this crate exports only its error type.

/// The errors of `planner`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("no devices to place the model on")]
    NoDevices,
}
