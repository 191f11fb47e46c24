//! `lora-kernels`: the arithmetic of merging LoRA adapters, `W' = round16(W + s·B·A)` with f32
//! accumulation and one rounding, on the CPU (multi-threaded) and on CUDA (PTX built by
//! `cargo xtask build-kernels`, embedded).
//!
//! Its implementation is the subject of the merge issue; until it lands this crate exports
//! only its error type. It deliberately does not read files or choose devices.

/// The errors of `lora-kernels`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("shape mismatch: {message}")]
    Shape { message: String },
}
