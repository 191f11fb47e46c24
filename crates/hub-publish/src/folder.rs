//! What goes up: the folder checked for completeness, every file hashed, the card decided.
//! Nothing here touches the network or writes to the folder.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::card::{front_matter, BaseFacts, ModelCard, REPO_PLACEHOLDER};
use crate::{Error, Event, Result};

/// The Hub refuses files over 50 GB (after they were uploaded: huggingface_hub #2030).
pub const HUB_MAX_FILE_BYTES: u64 = 50_000_000_000;

/// Files that size or smaller may be regular git files; the Hub's preupload answer decides.
const REGULAR_MAX_BYTES: u64 = 10 * 1024 * 1024;

/// Where a file's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    /// Made here (a generated or rewritten card).
    Bytes(Arc<[u8]>),
}

/// One file to publish.
#[derive(Debug, Clone)]
pub struct UploadFile {
    /// Relative path with `/` separators.
    pub path_in_repo: String,
    pub source: Source,
    pub size: u64,
    /// Lower-case hex SHA-256 of the content (the LFS object id).
    pub sha256: String,
    /// The git blob id (`sha1("blob {size}\0" + content)`) for files small enough to be
    /// regular git files; `None` for larger ones.
    pub git_oid: Option<String>,
    /// The first 512 bytes, which the preupload endpoint asks for.
    pub sample: Vec<u8>,
}

impl UploadFile {
    /// The Hub's usual choice for this file (the server decides at preupload).
    pub fn likely_lfs(&self) -> bool {
        self.size > REGULAR_MAX_BYTES
            || self.path_in_repo.ends_with(".safetensors")
            || self.path_in_repo.ends_with(".bin")
            || self.sample.contains(&0)
    }

    /// The whole content, for small files (regular files are sent inline in the commit).
    pub fn read_all(&self) -> std::io::Result<Vec<u8>> {
        match &self.source {
            Source::File(p) => std::fs::read(p),
            Source::Bytes(b) => Ok(b.to_vec()),
        }
    }
}

/// What to do about README.md.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum CardPolicy {
    /// Upload the folder's README.md (a weightsmith card gets the repository id in its usage
    /// snippet); write a card when there is none.
    #[default]
    KeepOrGenerate,
    /// Write a new card even when the folder has a README.md (the folder's is not changed).
    Generate,
}

/// Card facts the caller knows better than the folder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CardOverrides {
    pub base_model: Option<String>,
    pub license: Option<String>,
}

/// Where the uploaded README.md comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardOrigin {
    /// The folder's, unchanged.
    Folder,
    /// The folder's weightsmith card with the repository id put in.
    FolderWithRepoId,
    /// Written here.
    Generated,
}

/// A checked, hashed folder, ready to publish.
#[derive(Debug, Clone)]
pub struct PreparedFolder {
    pub folder: PathBuf,
    pub repo_id: String,
    pub files: Vec<UploadFile>,
    pub card_origin: CardOrigin,
    /// The README.md that will be uploaded.
    pub card: String,
    /// Things worth saying that do not stop the upload.
    pub warnings: Vec<String>,
}

impl PreparedFolder {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Checks that `folder` is a complete checkpoint that may be published to `repo_id`, hashes
/// every file (in parallel) and decides the card.
///
/// ```
/// use hub_publish::{prepare, CardOverrides, CardPolicy};
/// # let folder = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/models/tiny-llama"));
/// // No network: the folder's checks, hashes and card, as `publish --dry-run` shows them.
/// let prepared = prepare(folder, "me/tiny-llama", &CardPolicy::default(), &CardOverrides::default(), &|_| {})?;
/// assert!(prepared.files.iter().any(|f| f.path_in_repo == "model.safetensors.index.json"));
/// assert!(prepared.card.contains("library_name: transformers"));
/// # Ok::<(), hub_publish::Error>(())
/// ```
pub fn prepare(
    folder: &Path,
    repo_id: &str,
    policy: &CardPolicy,
    overrides: &CardOverrides,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<PreparedFolder> {
    validate_repo_id(repo_id)?;
    let meta = std::fs::symlink_metadata(folder).map_err(|e| Error::io(folder, e))?;
    if meta.file_type().is_symlink() {
        return Err(Error::Symlink {
            path: folder.to_path_buf(),
        });
    }
    if !meta.is_dir() {
        return Err(incomplete(folder, "not a folder"));
    }
    let mut rels = Vec::new();
    walk(folder, folder, &mut rels)?;
    rels.sort();

    check_checkpoint(folder, &rels)?;
    let mut warnings = Vec::new();
    let mut sizes = std::collections::HashMap::new();
    for r in &rels {
        let size = std::fs::metadata(folder.join(r))
            .map_err(|e| Error::io(folder.join(r), e))?
            .len();
        if size > HUB_MAX_FILE_BYTES {
            return Err(Error::FileTooLarge {
                path: folder.join(r),
                size,
                limit: HUB_MAX_FILE_BYTES,
            });
        }
        sizes.insert(r.as_str(), size);
    }

    // The card.
    let readme = rels.iter().any(|r| r == "README.md");
    let (card_origin, card) = match (policy, readme) {
        (CardPolicy::KeepOrGenerate, true) => {
            let text = std::fs::read(folder.join("README.md"))
                .map_err(|e| Error::io(folder.join("README.md"), e))?;
            let text = String::from_utf8_lossy(&text).into_owned();
            // --base-model sets base_model in the folder's own card, keeping the rest.
            let text = match &overrides.base_model {
                Some(b) => crate::card::with_base_model(&text, b),
                None => text,
            };
            if is_weightsmith_card(&text) && text.contains(REPO_PLACEHOLDER) {
                (
                    CardOrigin::FolderWithRepoId,
                    text.replace(REPO_PLACEHOLDER, repo_id),
                )
            } else {
                (CardOrigin::Folder, text)
            }
        }
        _ => (
            CardOrigin::Generated,
            generated_card(folder, repo_id, overrides).render(),
        ),
    };
    if card_origin == CardOrigin::Folder && front_matter(&card).is_empty() {
        warnings.push(
            "README.md has no YAML front matter: the Hub will not show base_model, license or tags (pass --card to write one)"
                .into(),
        );
    }

    // Hash everything, the largest files first, on as many threads as help.
    let mut order: Vec<(String, u64)> = rels
        .iter()
        .filter(|r| r.as_str() != "README.md" || card_origin == CardOrigin::Folder)
        .map(|r| {
            let size = std::fs::metadata(folder.join(r))
                .map(|m| m.len())
                .unwrap_or(0);
            (r.clone(), size)
        })
        .collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: u64 = order.iter().map(|(_, s)| s).sum();
    let done = AtomicU64::new(0);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4)
        .min(order.len().max(1))
        .min(8);
    let results: Vec<Result<Vec<UploadFile>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((rel, _)) = order.get(i) else { break };
                        let path = folder.join(rel);
                        let f = hash_file(&path, rel, &|n| {
                            let d = done.fetch_add(n, Ordering::Relaxed) + n;
                            progress(Event::Hashing {
                                done_bytes: d,
                                total_bytes: total,
                            });
                        })?;
                        mine.push(f);
                    }
                    Ok(mine)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("hashing thread panicked"))
            .collect()
    });
    let mut files = Vec::new();
    for r in results {
        files.extend(r?);
    }
    if card_origin != CardOrigin::Folder {
        files.push(bytes_file("README.md", card.as_bytes().into()));
    }
    files.sort_by(|a, b| a.path_in_repo.cmp(&b.path_in_repo));
    Ok(PreparedFolder {
        folder: folder.to_path_buf(),
        repo_id: repo_id.to_string(),
        files,
        card_origin,
        card,
        warnings,
    })
}

/// `owner/name` as the Hub accepts it.
pub fn validate_repo_id(repo_id: &str) -> Result<()> {
    if crate::card::looks_like_repo_id(repo_id) {
        Ok(())
    } else {
        Err(Error::InvalidRepoId {
            repo_id: repo_id.to_string(),
        })
    }
}

fn incomplete(path: &Path, message: impl Into<String>) -> Error {
    Error::IncompleteCheckpoint {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Every regular file under `dir`, relative, with `/` separators; symlinks refused; git and
/// cache folders of tools skipped.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ft = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if ft.is_symlink() {
            return Err(Error::Symlink { path });
        }
        if ft.is_dir() {
            if matches!(name.as_ref(), ".git" | ".cache" | ".huggingface") {
                continue;
            }
            walk(root, &path, out)?;
        } else if ft.is_file() {
            if matches!(name.as_ref(), ".DS_Store" | ".gitattributes") {
                continue;
            }
            let rel = path.strip_prefix(root).expect("under root");
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(rel.join("/"));
        } else {
            return Err(incomplete(
                &path,
                "not a regular file (a device, socket or pipe cannot be published)",
            ));
        }
    }
    Ok(())
}

fn check_checkpoint(folder: &Path, rels: &[String]) -> Result<()> {
    let has = |n: &str| rels.iter().any(|r| r == n);
    if !has("config.json") {
        return Err(incomplete(
            folder,
            "no config.json: transformers cannot load a model without it",
        ));
    }
    let cfg_path = folder.join("config.json");
    let text = std::fs::read(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    match serde_json::from_slice::<serde_json::Value>(&text) {
        Ok(v) if v.is_object() => {}
        Ok(_) => return Err(incomplete(&cfg_path, "config.json is not a JSON object")),
        Err(e) => {
            return Err(incomplete(
                &cfg_path,
                format!("config.json is not valid JSON: {e}"),
            ))
        }
    }
    for adapter in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_model.bin",
    ] {
        if has(adapter) {
            return Err(incomplete(
                &folder.join(adapter),
                "the folder holds PEFT adapter files: transformers would attach the adapter instead of using the weights (peft #1381); publish a merged folder (weightsmith merge) or the adapter on its own",
            ));
        }
    }
    let weights: Vec<&String> = rels
        .iter()
        .filter(|r| !r.contains('/') && r.ends_with(".safetensors"))
        .collect();
    if weights.is_empty() {
        let bin = rels
            .iter()
            .any(|r| r.ends_with(".bin") || r.ends_with(".pt"));
        return Err(incomplete(
            folder,
            if bin {
                "no .safetensors weights (only PyTorch pickles): weightsmith publishes safetensors checkpoints"
            } else {
                "no weights: no .safetensors file in the folder"
            },
        ));
    }
    let ckpt = st_io::Checkpoint::open(folder).map_err(|e| Error::Checkpoint {
        message: e.to_string(),
    })?;
    let used: std::collections::HashSet<String> =
        ckpt.files().iter().map(|f| f.name.clone()).collect();
    if let Some(stray) = weights.iter().find(|w| !used.contains(w.as_str())) {
        return Err(incomplete(
            &folder.join(stray.as_str()),
            "this weights file is not part of the checkpoint (not in the index): a leftover of another save? remove it or rebuild the index",
        ));
    }
    Ok(())
}

fn is_weightsmith_card(text: &str) -> bool {
    front_matter(text)
        .lines()
        .any(|l| l.trim() == "- weightsmith" || l.trim() == "- \"weightsmith\"")
}

fn generated_card(folder: &Path, repo_id: &str, o: &CardOverrides) -> ModelCard {
    let facts = BaseFacts::from_folder(folder);
    let base_model = o.base_model.clone().or(facts.base_model);
    ModelCard {
        base_model_relation: base_model.as_ref().map(|_| "merge".to_string()),
        base_model,
        license: o.license.clone().or(facts.license),
        pipeline_tag: facts.pipeline_tag,
        tags: vec!["merge".into(), "lora".into(), "weightsmith".into()],
        repo_id: Some(repo_id.to_string()),
        adapters: Vec::new(),
        dtype: facts.dtype,
        architecture: facts.architecture,
        tool: format!("weightsmith {}", env!("CARGO_PKG_VERSION")),
    }
}

fn git_header(size: u64) -> Vec<u8> {
    format!("blob {size}\0").into_bytes()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn bytes_file(path_in_repo: &str, bytes: Arc<[u8]>) -> UploadFile {
    let size = bytes.len() as u64;
    let mut sha1 = Sha1::new();
    sha1.update(git_header(size));
    sha1.update(&bytes);
    UploadFile {
        path_in_repo: path_in_repo.to_string(),
        size,
        sha256: hex(&Sha256::digest(&bytes)),
        git_oid: Some(hex(&sha1.finalize())),
        sample: bytes[..bytes.len().min(512)].to_vec(),
        source: Source::Bytes(bytes),
    }
}

fn hash_file(path: &Path, rel: &str, progress: &dyn Fn(u64)) -> Result<UploadFile> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut sha256 = Sha256::new();
    let mut sha1 = (size <= REGULAR_MAX_BYTES).then(|| {
        let mut h = Sha1::new();
        h.update(git_header(size));
        h
    });
    let mut buf = vec![0u8; 8 << 20];
    let mut sample = Vec::new();
    let mut seen = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        if sample.len() < 512 {
            let take = (512 - sample.len()).min(n);
            sample.extend_from_slice(&buf[..take]);
        }
        sha256.update(&buf[..n]);
        if let Some(h) = sha1.as_mut() {
            h.update(&buf[..n]);
        }
        seen += n as u64;
        progress(n as u64);
    }
    if seen != size {
        return Err(Error::io(
            path,
            std::io::Error::other(format!(
                "the file changed while it was read ({size} bytes before, {seen} read)"
            )),
        ));
    }
    Ok(UploadFile {
        path_in_repo: rel.to_string(),
        source: Source::File(path.to_path_buf()),
        size,
        sha256: hex(&sha256.finalize()),
        git_oid: sha1.map(|h| hex(&h.finalize())),
        sample,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_ids_match_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let f = bytes_file("x", b"hello\n".to_vec().into());
        assert_eq!(
            f.git_oid.as_deref(),
            Some("ce013625030ba8dba906f756967f9e9ca394464a")
        );
        assert_eq!(
            f.sha256,
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
    }
}
