//! `planner`: which device each placement unit (embedding, decoder layer, norm, head) and its
//! KV cache goes to.
//!
//! A pure function from (units, model dimensions, cache spec, devices, strategy) to a [`Plan`]:
//! no I/O, no CUDA, no clocks, no randomness, so every decision is property-tested. It
//! deliberately does not measure devices (that is `gpu-mem`) nor read checkpoints (`st-io`).
//!
//! What the plan counts on each GPU: the weights of its units; the KV cache of each of its
//! layers (2 × kv_heads × head_dim × positions × batch in the cache dtype, sliding-window
//! layers capped at the window); an overhead for the CUDA context, workspaces and activation
//! scratch ([`cache::default_overhead_bytes`] unless given); and on the head's device the
//! logits scratch. What the reserve must cover: everything else — memory other processes or
//! other models in this process will take after planning, and fragmentation headroom. The
//! capacity is the memory free for this model: memory this process already holds for another
//! model is not free, and must not be counted again in the reserve.

pub mod cache;
pub mod plan;

pub use cache::{CacheDtype, CacheSpec, ModelDims};
pub use plan::{
    max_seq_len, plan, DeviceLoad, DeviceSpec, Placement, Plan, PlanRequest, PlannedUnit, Strategy,
    UnitSpec,
};

use st_io::format_binary;

/// The errors of `planner`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("no devices to place the model on")]
    NoDevices,
    #[error("device {device}: reserve of {} is more than its {} of capacity", format_binary(*reserve_bytes), format_binary(*capacity_bytes))]
    ReserveTooLarge {
        device: String,
        reserve_bytes: u64,
        capacity_bytes: u64,
    },
    #[error("the split has {entries} entries but there are {devices} devices")]
    SplitLength { entries: usize, devices: usize },
    #[error("device {device}: split of {} is more than the {} it can hold after reserve and overhead", format_binary(*split_bytes), format_binary(*usable_bytes))]
    SplitTooLarge {
        device: String,
        split_bytes: u64,
        usable_bytes: u64,
    },
    #[error("the device map places {entries} units but the model has {units}")]
    PlacementLength { entries: usize, units: usize },
    #[error(
        "the device map puts \"{unit}\" on device {device}, but there {}",
        device_list(devices)
    )]
    UnknownDevice {
        unit: String,
        device: usize,
        devices: Vec<String>,
    },
    #[error("the layer split places {given} layers but the model has {layers}")]
    LayerCountMismatch { given: u64, layers: u64 },
    #[error("the model does not fit: it needs {} (weights, KV cache and overhead) and the devices offer {} after reserves; \"{first_unit}\" was the first unit that did not fit{}", format_binary(*needed_bytes), format_binary(*available_bytes), advice(suggestions))]
    DoesNotFit {
        needed_bytes: u64,
        available_bytes: u64,
        first_unit: String,
        suggestions: Vec<String>,
    },
}

fn device_list(devices: &[String]) -> String {
    match devices.len() {
        0 => "are no devices".into(),
        1 => format!("is one device ({})", devices[0]),
        n => format!("are {n} devices ({})", devices.join(", ")),
    }
}

fn advice(suggestions: &[String]) -> String {
    if suggestions.is_empty() {
        String::new()
    } else {
        format!("; what would fit: {}", suggestions.join("; "))
    }
}
