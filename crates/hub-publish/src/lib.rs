//! `hub-publish`: model cards and uploads of a finished checkpoint folder to the Hugging Face
//! Hub, on top of the official `hf-hub` crate.
//!
//! Its implementation is the subject of the publish issue; until it lands this crate exports
//! only its error type. It deliberately never modifies the folder it publishes.

/// The errors of `hub-publish`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: not a complete checkpoint: {message}")]
    IncompleteCheckpoint { path: String, message: String },
}
