//! `hub-publish`: model cards and uploads of a finished checkpoint folder to the Hugging Face
//! Hub, on top of the official `hf-hub` crate.
//!
//! Two steps, so a caller (or `--dry-run`) can see what would happen before any byte goes out:
//! [`prepare`] checks the folder (a complete checkpoint, no symlinks, no adapter files, no file
//! over the Hub's 50 GB limit), hashes every file and decides the card; [`publish`] creates the
//! repository when missing, asks the Hub which files it already has (a re-run sends only what
//! changed), uploads the rest — LFS `basic`/`multipart` transfers here, with retries per
//! request; Xet through `hf-hub` when the server asks for it — and makes one commit (or pull
//! request). The folder is never modified. The token is never printed: [`Token`] redacts
//! itself, and every message that came from a server passes through [`Token::redact`].
//!
//! ```no_run
//! use hub_publish::{prepare, publish, resolve_endpoint, resolve_token, CardOverrides,
//!     CardPolicy, PublishOptions};
//! let folder = std::path::Path::new("merged-model");
//! let prepared = prepare(folder, "me/merged-model", &CardPolicy::default(),
//!     &CardOverrides::default(), &|_| {})?;
//! let opts = PublishOptions::new(resolve_endpoint(None), resolve_token(None));
//! let report = publish(&prepared, &opts, &|_| {})?;
//! println!("{:?}", report.commit_url);
//! # Ok::<(), hub_publish::Error>(())
//! ```

use std::path::{Path, PathBuf};

pub mod card;
pub mod fetch;
mod folder;
mod hub;
mod token;

pub use card::{BaseFacts, CardAdapter, ModelCard, REPO_PLACEHOLDER};
pub use fetch::{download, mirror_headers, DownloadProgress, FetchOptions, FetchReport, HubId};
pub use folder::{
    prepare, validate_repo_id, CardOrigin, CardOverrides, CardPolicy, PreparedFolder, Source,
    UploadFile, HUB_MAX_FILE_BYTES,
};
pub use hub::{
    publish, publish_async, PublishOptions, PublishReport, RetryPolicy, PUBLISH_SCHEMA_VERSION,
};
pub use token::{resolve_endpoint, resolve_token, resolve_token_with, Token, TokenSource};

/// Progress of [`prepare`] and [`publish`], for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The folder's files read and hashed so far (the card, made in memory, not counted).
    Hashing {
        done_bytes: u64,
        total_bytes: u64,
    },
    Connecting {
        endpoint: String,
    },
    /// LFS bytes the server holds so far, of those this commit needs (objects it already had
    /// count as sent); small files travel inside the commit. With the Xet transfer, one event
    /// of every changed byte before hf-hub takes over.
    Uploading {
        sent_bytes: u64,
        total_bytes: u64,
    },
    /// The commit request, once every LFS object is up.
    Committing,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The errors of `hub-publish`. None of them contains the token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: not a complete checkpoint: {message}")]
    IncompleteCheckpoint { path: String, message: String },
    #[error("{message}")]
    Checkpoint { message: String },
    #[error("{}: is a symbolic link; publish refuses links (they can lead out of the folder): copy the file in instead", path.display())]
    Symlink { path: PathBuf },
    #[error("{}: {size} bytes, over the Hub's limit of {limit} bytes per file; write the checkpoint in smaller shards (weightsmith merge --max-shard-size 5GB)", path.display())]
    FileTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("\"{repo_id}\" is not a repository id: expected owner/name (letters, digits, '-', '_', '.')")]
    InvalidRepoId { repo_id: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login` (token file $HF_HOME/token or ~/.cache/huggingface/token)")]
    NoToken,
    #[error("{endpoint} rejected the token (401 Unauthorized){detail}; check --token / HF_TOKEN / the token file, and that the token is valid and has write access")]
    Unauthorized { endpoint: String, detail: String },
    #[error("not allowed to write to {repo_id} (403 Forbidden){detail}; the token needs write access to that namespace (a fine-grained token must list it)")]
    Forbidden { repo_id: String, detail: String },
    #[error("{url}: not found (404){detail}")]
    NotFound { url: String, detail: String },
    #[error("{url}: the server refused the upload as too large (413){detail}; write smaller shards (weightsmith merge --max-shard-size 5GB)")]
    TooLargeForServer { url: String, detail: String },
    #[error("{url}: server error {status} after {attempts} attempt(s){detail}; nothing was committed, run the same command again to resume")]
    Server {
        status: u16,
        url: String,
        attempts: u32,
        detail: String,
    },
    #[error("{url}: HTTP {status}{detail}")]
    Http {
        status: u16,
        url: String,
        detail: String,
    },
    #[error("cannot reach {endpoint}: {message}; check the network, --endpoint / HF_ENDPOINT")]
    Connect { endpoint: String, message: String },
    #[error("{url}: the transfer failed: {message}; run the same command again to resume")]
    Transport { url: String, message: String },
    #[error("{url}: unexpected answer from the server: {message}")]
    Protocol { url: String, message: String },
    #[error("Hub: {message}")]
    Hub { message: String },
}

impl Error {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}
