//! Where a verb's model or adapter comes from: a local path, or, when no local path of that name
//! exists, a Hub id `OWNER/NAME[@REVISION]`.
//!
//! `inspect` and `plan` need headers only ([`for_headers`]: config.json, the index and each
//! shard's header, by HTTP Range, laid out in a temporary folder); `load` and `merge` need the
//! files ([`for_model`], [`for_adapter`]), downloaded into the Hugging Face cache, shared with
//! Python. The environment says where and how (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_CACHE`,
//! `HF_HUB_OFFLINE`), as for huggingface_hub.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hub_publish::{DownloadProgress, FetchOptions, FetchReport, HubId};

use crate::Result;

/// A model or adapter ready to open.
#[derive(Debug)]
pub struct Source {
    /// The folder (or file) to open.
    pub path: PathBuf,
    /// The Hub id it came from, when it did.
    pub hub: Option<HubId>,
    /// What the fetch transferred (zero for a local path or a complete cache).
    pub fetched: FetchReport,
    /// The temporary folder of a header-only view, removed on drop.
    _mirror: Option<TempFolder>,
}

impl Source {
    /// What to show the user: the Hub id, or the path.
    pub fn display(&self) -> String {
        match &self.hub {
            Some(id) => id.to_string(),
            None => self.path.display().to_string(),
        }
    }
}

/// A folder removed on drop.
#[derive(Debug)]
struct TempFolder(PathBuf);

impl Drop for TempFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type ProgressHook = Box<dyn Fn(&str, DownloadProgress) + Send + Sync>;

static DOWNLOAD_PROGRESS: Mutex<Option<ProgressHook>> = Mutex::new(None);

/// Sets what every download reports to (the CLI draws a bar): the Hub id and the progress.
pub fn set_download_progress(hook: Option<ProgressHook>) {
    if let Ok(mut h) = DOWNLOAD_PROGRESS.lock() {
        *h = hook;
    }
}

fn report_progress(id: &HubId, p: DownloadProgress) {
    if let Ok(h) = DOWNLOAD_PROGRESS.lock() {
        if let Some(h) = h.as_ref() {
            h(&id.repo, p);
        }
    }
}

/// The Hub id `arg` names, when no local path of that name exists.
pub fn hub_id(arg: &Path) -> Option<HubId> {
    if arg.exists() || std::fs::symlink_metadata(arg).is_ok() {
        return None;
    }
    HubId::parse(arg.to_str()?)
}

fn local(arg: &Path) -> Source {
    Source {
        path: arg.to_path_buf(),
        hub: None,
        fetched: FetchReport::default(),
        _mirror: None,
    }
}

/// Headers only: config.json, the index, each shard's header (HTTP Range requests).
pub fn for_headers(arg: &Path) -> Result<Source> {
    let Some(id) = hub_id(arg) else {
        return Ok(local(arg));
    };
    let opts = FetchOptions::from_env();
    let dir = std::env::temp_dir().join(format!(
        "weightsmith-headers-{}-{}",
        std::process::id(),
        id.repo.replace('/', "--")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let guard = TempFolder(dir.clone());
    let (path, fetched) = hub_publish::mirror_headers(&id, &opts, &dir)?;
    Ok(Source {
        path,
        hub: Some(id),
        fetched,
        _mirror: Some(guard),
    })
}

/// Files of a model a verb reads besides the weights.
fn is_model_side_file(path: &str) -> bool {
    if path.contains('/') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    lower.ends_with(".json")
        || lower.ends_with(".jinja")
        || lower.ends_with(".model")
        || lower.ends_with(".tiktoken")
        || lower == "merges.txt"
        || lower == "vocab.txt"
        || lower == "readme.md"
}

/// A model's files: config, generation config, tokenizer and chat template files, the index,
/// and the safetensors shards the index names (or `model.safetensors`); nothing else (no
/// `.bin`, no `consolidated.safetensors` duplicate, no `original/`).
pub fn for_model(arg: &Path) -> Result<Source> {
    let Some(id) = hub_id(arg) else {
        return Ok(local(arg));
    };
    let opts = FetchOptions::from_env();
    let progress = |p| report_progress(&id, p);
    let (snap, first) = hub_publish::download(&id, &opts, &is_model_side_file, &progress)?;
    let index = snap.join(st_io::checkpoint::INDEX_FILE_NAME);
    let shards: Vec<String> = match std::fs::read(&index) {
        Ok(bytes) => st_io::ShardIndex::parse(&index, &bytes)?
            .weight_map
            .into_iter()
            .map(|(_, file)| file)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        Err(_) => vec!["model.safetensors".to_string()],
    };
    let wanted = move |p: &str| shards.iter().any(|s| s == p);
    let (snap, second) = hub_publish::download(&id, &opts, &wanted, &progress)?;
    Ok(Source {
        path: snap,
        hub: Some(id),
        fetched: FetchReport {
            commit: second.commit,
            bytes_received: first.bytes_received + second.bytes_received,
            requests: first.requests + second.requests,
            cached_files: first.cached_files + second.cached_files,
        },
        _mirror: None,
    })
}

/// A PEFT adapter's files: adapter_config.json and adapter_model.safetensors.
pub fn for_adapter(arg: &Path) -> Result<Source> {
    let Some(id) = hub_id(arg) else {
        return Ok(local(arg));
    };
    let opts = FetchOptions::from_env();
    let wanted = |p: &str| p == "adapter_config.json" || p == "adapter_model.safetensors";
    let (snap, fetched) = hub_publish::download(&id, &opts, &wanted, &|p| report_progress(&id, p))?;
    Ok(Source {
        path: snap,
        hub: Some(id),
        fetched,
        _mirror: None,
    })
}
