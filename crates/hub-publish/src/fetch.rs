//! Reading models from the Hub: headers with HTTP Range requests, whole files into the
//! standard Hugging Face cache.
//!
//! - [`HubId`] is `OWNER/NAME[@REVISION]`.
//! - [`mirror_headers`]: what `inspect` and `plan` need and nothing more: config.json, the
//!   index, and each shard's safetensors header, read with one ranged request per shard (all in
//!   flight at once; a second only for a header over 64 KiB). They are laid out in a folder as
//!   the checkpoint's own files, each shard a sparse file of its real length holding only its
//!   header, so st-io's strict checks run on them unchanged.
//! - [`download`]: the files a verb needs (shards, config, tokenizer, …) into `$HF_HUB_CACHE` in
//!   huggingface_hub's layout (`blobs/<oid>`, `snapshots/<commit>/<path>` → blob, `refs/<rev>`),
//!   so what Python downloaded is reused and what we download Python finds offline. Files in
//!   parallel; each resumed from its `.incomplete` after an interruption; every blob checked
//!   against its oid (SHA-256 for LFS files, the git blob id for the others) before it is
//!   renamed into place, so `snapshots/` never points at a half file. `HF_HUB_OFFLINE=1` uses the
//!   cache only. The disk's free space is checked before the first byte.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use sha1::Digest as _;

use crate::token::{resolve_endpoint, resolve_token, Token};
use crate::{Error, Result};

/// `OWNER/NAME[@REVISION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    /// A branch, tag or commit; `None` is `main`.
    pub revision: Option<String>,
}

impl HubId {
    /// Parses `owner/name` or `owner/name@revision` (letters, digits, `-`, `_`, `.` in each).
    pub fn parse(s: &str) -> Option<HubId> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if rev_ok(rev) => (r, Some(rev.to_string())),
            Some(_) => return None,
            None => (s, None),
        };
        crate::card::looks_like_repo_id(repo).then(|| HubId {
            repo: repo.to_string(),
            revision,
        })
    }

    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// Branch names may hold slashes (`refs/pr/1`).
fn rev_ok(rev: &str) -> bool {
    !rev.is_empty()
        && rev.split('/').all(|p| {
            !p.is_empty()
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(r) => write!(f, "{}@{r}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

/// Where and how to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub endpoint: String,
    pub token: Option<Token>,
    /// The hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE=1`: the cache only, no request.
    pub offline: bool,
    /// Files downloaded at once.
    pub parallel: usize,
    /// Attempts per request on a dropped connection or a 5xx.
    pub attempts: u32,
}

impl FetchOptions {
    /// From the environment, as huggingface_hub reads it.
    pub fn from_env() -> FetchOptions {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = env("HF_HUB_CACHE")
            .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .or_else(|| env("HF_HOME").map(|h| Path::new(&h).join("hub")))
            .or_else(|| env("XDG_CACHE_HOME").map(|h| Path::new(&h).join("huggingface/hub")))
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".cache/huggingface/hub")))
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        FetchOptions {
            endpoint: resolve_endpoint(None),
            token: resolve_token(None),
            cache_dir,
            offline,
            parallel: 8,
            attempts: 5,
        }
    }

    /// `models--owner--name` under the cache.
    pub fn repo_cache(&self, repo: &str) -> PathBuf {
        self.cache_dir
            .join(format!("models--{}", repo.replace('/', "--")))
    }
}

/// What a fetch transferred.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// The commit the revision resolved to.
    pub commit: String,
    /// Bytes of HTTP bodies received.
    pub bytes_received: u64,
    pub requests: u64,
    /// Files served from the cache without a transfer.
    pub cached_files: usize,
}

/// Progress of a [`download`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub files_done: usize,
    pub files_total: usize,
}

struct Client {
    http: reqwest::Client,
    opts: FetchOptions,
    id: HubId,
    bytes: AtomicU64,
    requests: AtomicU64,
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

fn encode_path(p: &str) -> String {
    p.split('/')
        .map(|seg| {
            seg.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl Client {
    fn new(id: &HubId, opts: &FetchOptions) -> Result<Client> {
        let http = reqwest::Client::builder()
            .user_agent(format!("weightsmith/{}; rust", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| Error::Connect {
                endpoint: opts.endpoint.clone(),
                message: e.to_string(),
            })?;
        Ok(Client {
            http,
            opts: opts.clone(),
            id: id.clone(),
            bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        })
    }

    fn redact(&self, s: &str) -> String {
        match &self.opts.token {
            Some(t) => t.redact(s),
            None => s.to_string(),
        }
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut r = self.http.get(url);
        if let Some(t) = &self.opts.token {
            r = r.bearer_auth(t.expose());
        }
        r
    }

    /// The error for a non-success answer, with what to do.
    async fn answer_error(&self, r: reqwest::Response, what: &str) -> Error {
        let status = r.status().as_u16();
        let code = r
            .headers()
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body: String = r
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        let detail = self.redact(body.trim());
        let repo = &self.id.repo;
        let endpoint = &self.opts.endpoint;
        let message = match (status, code.as_str()) {
            (_, "GatedRepo") => format!(
                "{repo} is gated: accept its license at {endpoint}/{repo} with your account, then set HF_TOKEN (or `hf auth login`) to a token of that account"
            ),
            (401, _) if self.opts.token.is_none() => format!(
                "{repo} needs a token (private or gated): set HF_TOKEN, or log in with `hf auth login`"
            ),
            (401, _) => format!("{endpoint} rejected the token for {repo}: check HF_TOKEN or the token file"),
            (403, _) => format!(
                "the token may not read {repo} (403): a gated model needs its license accepted at {endpoint}/{repo}, a fine-grained token must list the repository"
            ),
            (404, "RevisionNotFound") => format!(
                "{repo} has no revision \"{}\" (404): check the branch, tag or commit after @",
                self.id.revision()
            ),
            (404, "EntryNotFound") => format!("{repo}@{}: {what} not found (404)", self.id.revision()),
            (404, _) => format!(
                "no repository {repo} on {endpoint} (404): check the name, or set HF_TOKEN if it is private"
            ),
            (s, _) => format!("{what}: HTTP {s}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") }),
        };
        Error::Hub { message }
    }

    fn transport(&self, url: &str, e: reqwest::Error) -> Error {
        if e.is_connect() {
            Error::Connect {
                endpoint: self.opts.endpoint.clone(),
                message: self.redact(&e.to_string()),
            }
        } else {
            Error::Transport {
                url: url.to_string(),
                message: self.redact(&e.to_string()),
            }
        }
    }

    /// A GET with retries on connection errors and 5xx/429.
    async fn send(
        &self,
        url: &str,
        range: Option<(u64, Option<u64>)>,
        what: &str,
    ) -> Result<reqwest::Response> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.get(url);
            if let Some((from, to)) = range {
                let v = match to {
                    Some(to) => format!("bytes={from}-{to}"),
                    None => format!("bytes={from}-"),
                };
                req = req.header(reqwest::header::RANGE, v);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => return Ok(r),
                Ok(r)
                    if (r.status().is_server_error() || r.status().as_u16() == 429)
                        && attempt < self.opts.attempts => {}
                Ok(r) => return Err(self.answer_error(r, what).await),
                Err(e) if attempt < self.opts.attempts && !e.is_builder() => {}
                Err(e) => return Err(self.transport(url, e)),
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
        }
    }

    async fn json(&self, url: &str, what: &str) -> Result<Value> {
        let r = self.send(url, None, what).await?;
        let bytes = r.bytes().await.map_err(|e| self.transport(url, e))?;
        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
            url: url.to_string(),
            message: format!("not JSON: {e}"),
        })
    }

    fn resolve_url(&self, commit: &str, file: &str) -> String {
        format!(
            "{}/{}/resolve/{commit}/{}",
            self.opts.endpoint,
            self.id.repo,
            encode_path(file)
        )
    }

    /// The commit of the revision and the repository's files (path → size, oid, lfs).
    async fn listing(&self) -> Result<(String, BTreeMap<String, Entry>)> {
        let rev = self.id.revision();
        let info_url = format!(
            "{}/api/models/{}/revision/{}",
            self.opts.endpoint,
            self.id.repo,
            encode_path(rev)
        );
        let info = self.json(&info_url, "repository info").await?;
        let commit = info
            .get("sha")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Protocol {
                url: info_url.clone(),
                message: "no \"sha\" in the repository info".into(),
            })?
            .to_string();
        let mut files = BTreeMap::new();
        let mut url = Some(format!(
            "{}/api/models/{}/tree/{commit}?recursive=true&expand=false",
            self.opts.endpoint, self.id.repo
        ));
        while let Some(u) = url.take() {
            let r = self.send(&u, None, "file listing").await?;
            url = next_link(r.headers());
            let bytes = r.bytes().await.map_err(|e| self.transport(&u, e))?;
            self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
                url: u.clone(),
                message: format!("not JSON: {e}"),
            })?;
            for e in v.as_array().into_iter().flatten() {
                if e.get("type").and_then(Value::as_str) != Some("file") {
                    continue;
                }
                let (Some(path), Some(size)) = (
                    e.get("path").and_then(Value::as_str),
                    e.get("size").and_then(Value::as_u64),
                ) else {
                    continue;
                };
                let lfs = e
                    .get("lfs")
                    .and_then(|l| l.get("oid"))
                    .and_then(Value::as_str);
                let oid = lfs
                    .or_else(|| e.get("oid").and_then(Value::as_str))
                    .unwrap_or_default()
                    .to_string();
                let size = e
                    .get("lfs")
                    .and_then(|l| l.get("size"))
                    .and_then(Value::as_u64)
                    .unwrap_or(size);
                files.insert(
                    path.to_string(),
                    Entry {
                        size,
                        oid,
                        lfs: lfs.is_some(),
                    },
                );
            }
        }
        Ok((commit, files))
    }
}

/// `Link: <url>; rel="next"`.
fn next_link(h: &reqwest::header::HeaderMap) -> Option<String> {
    let link = h.get("link")?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (url, rest) = part.split_once(';')?;
        rest.contains("rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

/// One file of the repository.
#[derive(Debug, Clone)]
struct Entry {
    size: u64,
    /// SHA-256 for LFS files, the git blob id for the others: the blob's name in the cache.
    oid: String,
    lfs: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| Error::Hub {
            message: format!("cannot start the network runtime: {e}"),
        })
}

/// The commit and snapshot folder of `id` in the cache, when its revision resolves there (a
/// commit, or `refs/<rev>`); which files the snapshot holds is the caller's to check.
pub fn cached_snapshot(id: &HubId, opts: &FetchOptions) -> Option<(String, PathBuf)> {
    let repo = opts.repo_cache(&id.repo);
    let rev = id.revision();
    let commit = if is_commit(rev) {
        rev.to_string()
    } else {
        std::fs::read_to_string(repo.join("refs").join(rev))
            .ok()?
            .trim()
            .to_string()
    };
    let snap = repo.join("snapshots").join(&commit);
    snap.is_dir().then_some((commit, snap))
}

/// Whether a snapshot folder holds what a checkpoint needs: config.json and either the index
/// with every shard it names, or model.safetensors.
fn snapshot_has_checkpoint(snap: &Path) -> bool {
    if !snap.join("config.json").is_file() {
        return false;
    }
    let index = snap.join("model.safetensors.index.json");
    if let Ok(text) = std::fs::read(&index) {
        let Ok(v) = serde_json::from_slice::<Value>(&text) else {
            return false;
        };
        let Some(map) = v.get("weight_map").and_then(Value::as_object) else {
            return false;
        };
        return map
            .values()
            .filter_map(Value::as_str)
            .all(|f| snap.join(f).is_file());
    }
    snap.join("model.safetensors").is_file()
}

/// Speculative first read of each shard: most headers fit (Llama-405B's are under 1 KB each).
const FIRST_READ: u64 = 64 << 10;

/// Lays out in `dest` what `inspect` and `plan` need of `id`: config.json, the index, and each
/// shard as a sparse file of its real length holding only its header. A complete snapshot in
/// the cache is used instead, with no request (its path is returned).
pub fn mirror_headers(
    id: &HubId,
    opts: &FetchOptions,
    dest: &Path,
) -> Result<(PathBuf, FetchReport)> {
    if let Some((commit, snap)) = cached_snapshot(id, opts) {
        if snapshot_has_checkpoint(&snap) {
            return Ok((
                snap,
                FetchReport {
                    commit,
                    ..FetchReport::default()
                },
            ));
        }
    }
    if opts.offline {
        return Err(Error::Hub {
            message: format!(
                "{id} is not in the cache ({}) and HF_HUB_OFFLINE is set: download it once online, or unset HF_HUB_OFFLINE",
                opts.cache_dir.display()
            ),
        });
    }
    let rt = runtime()?;
    let client = Arc::new(Client::new(id, opts)?);
    let (commit, files) = rt.block_on(client.listing())?;
    let has = |f: &str| files.contains_key(f);
    if !has("config.json") {
        return Err(Error::Hub {
            message: format!("{id} has no config.json: not a transformers model repository"),
        });
    }
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let small = |name: &'static str| {
        let client = client.clone();
        let commit = commit.clone();
        async move {
            let url = client.resolve_url(&commit, name);
            let r = client.send(&url, None, name).await?;
            let b = r.bytes().await.map_err(|e| client.transport(&url, e))?;
            client.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
            Ok::<_, Error>(b.to_vec())
        }
    };
    let config = rt.block_on(small("config.json"))?;
    write_file(&dest.join("config.json"), &config)?;
    let shards: Vec<String> = if has("model.safetensors.index.json") {
        let index = rt.block_on(small("model.safetensors.index.json"))?;
        write_file(&dest.join("model.safetensors.index.json"), &index)?;
        let v: Value = serde_json::from_slice(&index).map_err(|e| Error::Hub {
            message: format!("{id}: model.safetensors.index.json is not JSON: {e}"),
        })?;
        let mut names: Vec<String> = v
            .get("weight_map")
            .and_then(Value::as_object)
            .map(|m| {
                m.values()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.dedup();
        names
    } else if has("model.safetensors") {
        vec!["model.safetensors".to_string()]
    } else {
        return Err(Error::Hub {
            message: format!("{id} has no safetensors weights (model.safetensors or its index)"),
        });
    };
    // Every shard's header at once.
    let reads = shards.iter().map(|name| {
        let client = client.clone();
        let commit = commit.clone();
        let name = name.clone();
        let size = files.get(&name).map(|e| e.size);
        async move {
            let url = client.resolve_url(&commit, &name);
            let first = read_range(&client, &url, 0, FIRST_READ, &name).await?;
            if first.0.len() < 8 {
                return Err(Error::Hub {
                    message: format!(
                        "{id}: {name} is {} bytes, too short for a safetensors file",
                        first.0.len()
                    ),
                });
            }
            let n = u64::from_le_bytes(first.0[..8].try_into().unwrap_or_default());
            let total = first.1.or(size).unwrap_or(0);
            let want = 8u64.saturating_add(n).min(total.max(8));
            let mut head = first.0;
            if (head.len() as u64) < want && want <= 100_000_008 {
                let more = read_range(
                    &client,
                    &url,
                    head.len() as u64,
                    want - head.len() as u64,
                    &name,
                )
                .await?;
                head.extend_from_slice(&more.0);
            }
            head.truncate(want as usize);
            Ok::<_, Error>((name, head, total))
        }
    });
    let results: Vec<Result<(String, Vec<u8>, u64)>> =
        rt.block_on(futures::stream::iter(reads).buffer_unordered(64).collect());
    for r in results {
        let (name, head, total) = r?;
        let path = dest.join(&name);
        let mut f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        f.write_all(&head).map_err(|e| Error::io(&path, e))?;
        // The rest of the file is a hole: its real length, no bytes on disk.
        f.set_len(total.max(head.len() as u64))
            .map_err(|e| Error::io(&path, e))?;
    }
    let report = FetchReport {
        commit,
        bytes_received: client.bytes.load(Ordering::Relaxed),
        requests: client.requests.load(Ordering::Relaxed),
        cached_files: 0,
    };
    Ok((dest.to_path_buf(), report))
}

/// `len` bytes from `from`; the file's total length when the server says (Content-Range).
async fn read_range(
    client: &Client,
    url: &str,
    from: u64,
    len: u64,
    what: &str,
) -> Result<(Vec<u8>, Option<u64>)> {
    let r = client
        .send(url, Some((from, Some(from + len - 1))), what)
        .await?;
    let total = r
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit_once('/'))
        .and_then(|(_, t)| t.parse().ok());
    let partial = r.status().as_u16() == 206;
    let mut out = Vec::new();
    let mut stream = r.bytes_stream();
    // A server that ignores Range sends the whole file: stop reading after what was asked.
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| client.transport(url, e))?;
        client
            .bytes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        out.extend_from_slice(&chunk);
        if out.len() as u64 >= len {
            break;
        }
    }
    if !partial {
        out = out.get(from as usize..).unwrap_or_default().to_vec();
    }
    out.truncate(len as usize);
    Ok((out, total))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Downloads the files of `id` that `wanted` accepts into the cache and returns the snapshot
/// folder (`snapshots/<commit>`). Files already in the cache are not fetched again.
pub fn download(
    id: &HubId,
    opts: &FetchOptions,
    wanted: &(dyn Fn(&str) -> bool + Sync),
    progress: &(dyn Fn(DownloadProgress) + Sync),
) -> Result<(PathBuf, FetchReport)> {
    if opts.offline {
        let Some((commit, snap)) = cached_snapshot(id, opts) else {
            return Err(Error::Hub {
                message: format!(
                    "{id} is not in the cache ({}) and HF_HUB_OFFLINE is set: download it once online, or unset HF_HUB_OFFLINE",
                    opts.cache_dir.display()
                ),
            });
        };
        return Ok((
            snap,
            FetchReport {
                commit,
                ..FetchReport::default()
            },
        ));
    }
    let rt = runtime()?;
    let client = Arc::new(Client::new(id, opts)?);
    let (commit, files) = rt.block_on(client.listing())?;
    let repo_dir = opts.repo_cache(&id.repo);
    let snap = repo_dir.join("snapshots").join(&commit);
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
    let chosen: Vec<(String, Entry)> = files.into_iter().filter(|(p, _)| wanted(p)).collect();
    let mut cached = 0;
    let mut todo = Vec::new();
    for (path, e) in chosen {
        if e.oid.is_empty() || e.oid.contains(['/', '.']) {
            return Err(Error::Protocol {
                url: client.resolve_url(&commit, &path),
                message: format!("the listing gives {path} no usable oid"),
            });
        }
        if path
            .split('/')
            .any(|p| p.is_empty() || p == ".." || p == ".")
        {
            return Err(Error::Protocol {
                url: client.resolve_url(&commit, &path),
                message: format!("the listing names a file \"{path}\" outside the repository"),
            });
        }
        if blobs.join(&e.oid).is_file() {
            cached += 1;
            link_snapshot(&snap, &path, &e.oid)?;
        } else {
            todo.push((path, e));
        }
    }
    // Refused before the first byte when the cache's disk cannot hold what is missing.
    let needed: u64 = todo
        .iter()
        .map(|(_, e)| {
            let have = std::fs::metadata(blobs.join(format!("{}.incomplete", e.oid)))
                .map(|m| m.len())
                .unwrap_or(0);
            e.size.saturating_sub(have)
        })
        .sum();
    if let Some(free) = st_io::paths::free_bytes(&blobs) {
        if free < needed {
            return Err(Error::Hub {
                message: format!(
                    "{id}: the download needs {} and {} has {} free; free some space or set HF_HUB_CACHE to a larger disk",
                    st_io::format_decimal(needed),
                    opts.cache_dir.display(),
                    st_io::format_decimal(free)
                ),
            });
        }
    }
    let total: u64 = todo.iter().map(|(_, e)| e.size).sum();
    let done = AtomicU64::new(0);
    let files_done = std::sync::atomic::AtomicUsize::new(0);
    let files_total = todo.len();
    progress(DownloadProgress {
        done_bytes: 0,
        total_bytes: total,
        files_done: 0,
        files_total,
    });
    let jobs = todo.iter().map(|(path, e)| {
        let client = client.clone();
        let url = client.resolve_url(&commit, path);
        let blobs = &blobs;
        let done = &done;
        let files_done = &files_done;
        async move {
            fetch_blob(&client, &url, path, e, blobs, &|n| {
                let d = done.fetch_add(n, Ordering::Relaxed) + n;
                progress(DownloadProgress {
                    done_bytes: d,
                    total_bytes: total,
                    files_done: files_done.load(Ordering::Relaxed),
                    files_total,
                });
            })
            .await?;
            files_done.fetch_add(1, Ordering::Relaxed);
            Ok::<_, Error>(())
        }
    });
    let results: Vec<Result<()>> = rt.block_on(
        futures::stream::iter(jobs)
            .buffer_unordered(opts.parallel.max(1))
            .collect(),
    );
    for r in results {
        r?;
    }
    for (path, e) in &todo {
        link_snapshot(&snap, path, &e.oid)?;
    }
    if !is_commit(id.revision()) {
        let refs = repo_dir.join("refs").join(id.revision());
        if let Some(parent) = refs.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        write_file(&refs, commit.as_bytes())?;
    }
    std::fs::create_dir_all(&snap).map_err(|e| Error::io(&snap, e))?;
    progress(DownloadProgress {
        done_bytes: total,
        total_bytes: total,
        files_done: files_total,
        files_total,
    });
    let report = FetchReport {
        commit,
        bytes_received: client.bytes.load(Ordering::Relaxed),
        requests: client.requests.load(Ordering::Relaxed),
        cached_files: cached,
    };
    Ok((snap, report))
}

/// `snapshots/<commit>/<path>` → `../../blobs/<oid>` (relative, as huggingface_hub links).
fn link_snapshot(snap: &Path, path: &str, oid: &str) -> Result<()> {
    let link = snap.join(path);
    let depth = path.split('/').count() - 1;
    let mut target = PathBuf::new();
    for _ in 0..depth + 2 {
        target.push("..");
    }
    target.push("blobs");
    target.push(oid);
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    match std::fs::read_link(&link) {
        Ok(t) if t == target => return Ok(()),
        Ok(_) => std::fs::remove_file(&link).map_err(|e| Error::io(&link, e))?,
        Err(_) if link.exists() => std::fs::remove_file(&link).map_err(|e| Error::io(&link, e))?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(&target, &link).map_err(|e| Error::io(&link, e))
}

/// The hash a blob's oid is: SHA-256 of the bytes (LFS), or git's blob id (SHA-1 of
/// `blob <len>\0` and the bytes).
enum Hasher {
    Sha256(sha2::Sha256),
    Git(sha1::Sha1),
}

impl Hasher {
    fn new(e: &Entry) -> Hasher {
        if e.lfs || e.oid.len() == 64 {
            Hasher::Sha256(sha2::Sha256::new())
        } else {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {}\0", e.size).as_bytes());
            Hasher::Git(h)
        }
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => sha2::Digest::update(h, b),
            Hasher::Git(h) => h.update(b),
        }
    }

    fn hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::Sha256(h) => sha2::Digest::finalize(h).to_vec(),
            Hasher::Git(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Downloads one blob: resumed from `<oid>.incomplete`, hashed as it arrives, renamed into
/// `blobs/<oid>` once its hash is the oid. A body whose hash is not the oid is fetched once
/// more from the start, then refused. Like huggingface_hub, the blob is not fsynced: a killed
/// process leaves at most an `.incomplete`, never a wrong blob.
async fn fetch_blob(
    client: &Client,
    url: &str,
    path: &str,
    e: &Entry,
    blobs: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let blob = blobs.join(&e.oid);
    let partial = blobs.join(format!("{}.incomplete", e.oid));
    for round in 0..2 {
        let mut have = tokio::fs::metadata(&partial)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if have > e.size {
            have = 0;
        }
        // What an earlier run left is hashed first (the rest is hashed as it arrives).
        let mut hasher = Hasher::new(e);
        if have > 0 {
            let reading = partial.clone();
            let (h, n) = tokio::task::spawn_blocking(move || -> std::io::Result<(Hasher, u64)> {
                use std::io::Read;
                let mut f = std::fs::File::open(&reading)?.take(have);
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                loop {
                    let k = f.read(&mut buf)?;
                    if k == 0 {
                        break;
                    }
                    hasher.update(&buf[..k]);
                    n += k as u64;
                }
                Ok((hasher, n))
            })
            .await
            .map_err(|er| Error::Hub {
                message: er.to_string(),
            })?
            .map_err(|er| Error::io(&partial, er))?;
            hasher = h;
            have = n;
            progress(have);
        }
        let mut attempts = 0;
        while have < e.size {
            attempts += 1;
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&partial)
                .await
                .map_err(|er| Error::io(&partial, er))?;
            file.set_len(have)
                .await
                .map_err(|er| Error::io(&partial, er))?;
            let mut file = tokio::io::BufWriter::with_capacity(8 << 20, file);
            tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(have))
                .await
                .map_err(|er| Error::io(&partial, er))?;
            let r = client
                .send(url, (have > 0).then_some((have, None)), path)
                .await?;
            if have > 0 && r.status().as_u16() != 206 {
                // The server ignored the range: start again.
                file.get_mut()
                    .set_len(0)
                    .await
                    .map_err(|er| Error::io(&partial, er))?;
                tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(0))
                    .await
                    .map_err(|er| Error::io(&partial, er))?;
                have = 0;
                hasher = Hasher::new(e);
            }
            let mut stream = r.bytes_stream();
            let mut broke = None;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => {
                        let c = &c[..c.len().min((e.size - have) as usize)];
                        file.write_all(c)
                            .await
                            .map_err(|er| Error::io(&partial, er))?;
                        hasher.update(c);
                        client.bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
                        have += c.len() as u64;
                        progress(c.len() as u64);
                    }
                    Err(er) => {
                        broke = Some(er);
                        break;
                    }
                }
            }
            file.flush().await.map_err(|er| Error::io(&partial, er))?;
            drop(file);
            if have < e.size {
                let message = broke
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "the connection closed early".into());
                if attempts >= client.opts.attempts {
                    return Err(Error::Transport {
                        url: url.to_string(),
                        message: format!(
                            "{path}: {message} after {have} of {} bytes ({attempts} attempts); run again to resume",
                            e.size
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100 << attempts.min(5))).await;
            }
        }
        let digest = hasher.hex();
        if digest == e.oid {
            tokio::fs::rename(&partial, &blob)
                .await
                .map_err(|er| Error::io(&blob, er))?;
            return Ok(());
        }
        let _ = tokio::fs::remove_file(&partial).await;
        if round == 1 {
            return Err(Error::Hub {
                message: format!(
                    "{}: {path} arrived with hash {digest}, not its oid {}, twice: refused (nothing was kept); try again later",
                    client.id, e.oid
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_ids() {
        assert_eq!(
            HubId::parse("meta-llama/Llama-3.1-8B"),
            Some(HubId {
                repo: "meta-llama/Llama-3.1-8B".into(),
                revision: None
            })
        );
        let r = HubId::parse("a/b@v1.0").unwrap();
        assert_eq!((r.repo.as_str(), r.revision()), ("a/b", "v1.0"));
        assert_eq!(
            HubId::parse("a/b@refs/pr/3").unwrap().revision(),
            "refs/pr/3"
        );
        for bad in [
            "a",
            "a/b/c",
            "/a",
            "a/b@",
            "a/b@..",
            "./m",
            "../x/m",
            "a/b@x/../y",
        ] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn git_blob_ids_and_sha256_oids() {
        let e = Entry {
            size: 5,
            oid: String::new(),
            lfs: false,
        };
        let mut h = Hasher::new(&e);
        h.update(b"hello");
        // git hash-object of "hello" (no newline).
        assert_eq!(h.hex(), "b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0");
        let e = Entry {
            size: 5,
            oid: String::new(),
            lfs: true,
        };
        let mut h = Hasher::new(&e);
        h.update(b"hello");
        assert_eq!(
            h.hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}
