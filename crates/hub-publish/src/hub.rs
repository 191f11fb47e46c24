//! The upload: repository and branch through `hf-hub`, then what `hf-hub` 1.0 does not do —
//! resumption against the remote tree, the LFS `basic` and `multipart` transfers, per-request
//! retries — and one commit. When the Hub answers the LFS batch with `xet`, the files go
//! through `hf-hub`'s Xet upload and commit instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{StreamExt, TryStreamExt};
use hf_hub::{HFClient, HFError, RepoTypeModel};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::folder::{PreparedFolder, Source, UploadFile};
use crate::token::Token;
use crate::{Error, Event, Result};

/// How transient failures (connection errors, timeouts, 408, 429, 5xx) are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries per request, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// `https://huggingface.co` or a mirror; see [`crate::resolve_endpoint`].
    pub endpoint: String,
    pub token: Option<Token>,
    /// Used only when the repository is created.
    pub private: bool,
    /// The branch to commit to (created from main when missing); `main` when `None`.
    pub revision: Option<String>,
    pub commit_message: Option<String>,
    pub commit_description: Option<String>,
    /// Open a pull request instead of committing to the branch.
    pub create_pr: bool,
    pub retry: RetryPolicy,
    /// Files (and parts of one file) sent at once.
    pub parallel_uploads: usize,
}

impl PublishOptions {
    pub fn new(endpoint: impl Into<String>, token: Option<Token>) -> PublishOptions {
        PublishOptions {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            token,
            private: false,
            revision: None,
            commit_message: None,
            commit_description: None,
            create_pr: false,
            retry: RetryPolicy::default(),
            parallel_uploads: 4,
        }
    }
}

/// The version of [`PublishReport`]'s JSON form (`weightsmith publish --json`); it changes
/// only when a field changes meaning or goes away.
pub const PUBLISH_SCHEMA_VERSION: u32 = 1;

/// What a publish did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PublishReport {
    pub schema_version: u32,
    pub repo_id: String,
    pub repo_url: String,
    pub revision: String,
    /// `None` when nothing changed and no commit was made.
    pub commit_url: Option<String>,
    pub commit_oid: Option<String>,
    pub pr_url: Option<String>,
    /// Files in the commit.
    pub committed: Vec<String>,
    /// Files the remote already had with the same content (not sent, not committed).
    pub unchanged: Vec<String>,
    /// LFS objects the server already held (committed but not sent again).
    pub already_uploaded: Vec<String>,
    /// Bytes sent as LFS objects or inline content.
    pub bytes_sent: u64,
    /// The LFS transfer the server chose (`basic`, `multipart`, `xet`), if any.
    pub transfer: Option<String>,
    pub seconds: f64,
}

/// Publishes a prepared folder: creates the repository when missing, skips what the remote
/// already has, uploads the rest with retries, and makes one commit.
///
/// Runs its own tokio runtime; from async code call [`publish_async`].
pub fn publish(
    prepared: &PreparedFolder,
    opts: &PublishOptions,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<PublishReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| Error::io(&prepared.folder, e))?;
    rt.block_on(publish_async(prepared, opts, progress))
}

/// [`publish`] for callers that have a tokio runtime.
pub async fn publish_async(
    prepared: &PreparedFolder,
    opts: &PublishOptions,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<PublishReport> {
    let started = Instant::now();
    let token = opts.token.clone().ok_or(Error::NoToken)?;
    let hub = Hub::new(opts, token, &prepared.repo_id)?;
    let revision = opts.revision.clone().unwrap_or_else(|| "main".to_string());

    progress(Event::Connecting {
        endpoint: opts.endpoint.clone(),
    });
    let repo_url = hub.ensure_repo(opts.private).await?;
    if revision != "main" {
        hub.ensure_branch(&revision).await?;
    }

    // Resumption: what the remote already has.
    let remote = hub
        .paths_info(
            &revision,
            prepared.files.iter().map(|f| f.path_in_repo.clone()),
        )
        .await?;
    let mut unchanged = Vec::new();
    let mut todo: Vec<&UploadFile> = Vec::new();
    for f in &prepared.files {
        let same = remote.get(&f.path_in_repo).is_some_and(|r| r.same_as(f));
        if same {
            unchanged.push(f.path_in_repo.clone());
        } else {
            todo.push(f);
        }
    }
    let mut report = PublishReport {
        schema_version: PUBLISH_SCHEMA_VERSION,
        repo_id: prepared.repo_id.clone(),
        repo_url,
        revision: revision.clone(),
        commit_url: None,
        commit_oid: None,
        pr_url: None,
        committed: Vec::new(),
        unchanged,
        already_uploaded: Vec::new(),
        bytes_sent: 0,
        transfer: None,
        seconds: 0.0,
    };
    if todo.is_empty() {
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }

    // Regular or LFS, as the server says.
    let modes = hub.preupload(&revision, &todo).await?;
    let mut lfs: Vec<&UploadFile> = Vec::new();
    let mut regular: Vec<&UploadFile> = Vec::new();
    for f in todo {
        match modes.get(&f.path_in_repo) {
            Some(m) if m.should_ignore => {
                return Err(Error::Protocol {
                    url: hub.api("preupload"),
                    message: format!(
                        "the server would ignore {} (a .gitignore rule in the repository?); remove it from the folder or from .gitignore",
                        f.path_in_repo
                    ),
                })
            }
            Some(m) if m.upload_mode == "lfs" && f.size > 0 => lfs.push(f),
            Some(_) => regular.push(f),
            None => {
                return Err(Error::Protocol {
                    url: hub.api("preupload"),
                    message: format!("the answer did not mention {}", f.path_in_repo),
                })
            }
        }
    }

    let total_bytes: u64 = lfs.iter().chain(&regular).map(|f| f.size).sum();
    // The upload phase carries the LFS objects; the small files travel inside the commit. Its
    // events count the LFS bytes, so that a progress bar ends at 100 % when the phase does.
    let lfs_bytes: u64 = lfs.iter().map(|f| f.size).sum();
    let sent = Arc::new(AtomicU64::new(0));
    if !lfs.is_empty() {
        let batch = hub.lfs_batch(&revision, &lfs).await?;
        report.transfer = batch.transfer.clone();
        if batch.transfer.as_deref() == Some("xet") {
            // hf-hub owns the Xet protocol: hand it every changed file and let it commit.
            let all: Vec<&UploadFile> = lfs.iter().chain(&regular).copied().collect();
            progress(Event::Uploading {
                sent_bytes: 0,
                total_bytes,
            });
            let info = hub.xet_commit(&revision, &all, opts).await?;
            report.committed = all.iter().map(|f| f.path_in_repo.clone()).collect();
            report.bytes_sent = total_bytes;
            report.commit_url = info.0;
            report.commit_oid = info.1;
            report.pr_url = info.2;
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        let objects: HashMap<String, LfsObject> = batch
            .objects
            .into_iter()
            .map(|o| (o.oid.clone(), o))
            .collect();
        let transfer = batch.transfer.unwrap_or_else(|| "basic".to_string());
        let jobs: Vec<(&UploadFile, &LfsObject)> = lfs
            .iter()
            .map(|f| {
                objects
                    .get(&f.sha256)
                    .map(|o| (*f, o))
                    .ok_or_else(|| Error::Protocol {
                        url: hub.lfs_batch_url(),
                        message: format!(
                            "the LFS batch answer has no object for {} ({})",
                            f.path_in_repo, f.sha256
                        ),
                    })
            })
            .collect::<Result<_>>()?;
        for (f, o) in &jobs {
            if let Some(e) = &o.error {
                return Err(Error::Protocol {
                    url: hub.lfs_batch_url(),
                    message: format!(
                        "the server refused the LFS object of {}: {} {}",
                        f.path_in_repo, e.code, e.message
                    ),
                });
            }
            if o.actions.as_ref().and_then(|a| a.upload.as_ref()).is_none() {
                report.already_uploaded.push(f.path_in_repo.clone());
                sent.fetch_add(f.size, Ordering::Relaxed);
            }
        }
        let hub_ref = &hub;
        let transfer_ref = transfer.as_str();
        let sent_ref = &sent;
        let uploads =
            futures::stream::iter(jobs.into_iter().map(|(f, o)| async move {
                hub_ref.upload_lfs(f, o, transfer_ref, sent_ref).await
            }))
            .buffer_unordered(opts.parallel_uploads.max(1))
            .try_collect::<Vec<()>>();
        let ticker = async {
            loop {
                progress(Event::Uploading {
                    sent_bytes: sent.load(Ordering::Relaxed),
                    total_bytes: lfs_bytes,
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            r = uploads => { r?; }
            () = ticker => {}
        }
        progress(Event::Uploading {
            sent_bytes: sent.load(Ordering::Relaxed),
            total_bytes: lfs_bytes,
        });
    }

    progress(Event::Committing);
    let (commit_url, commit_oid, pr_url) = hub.commit(&revision, &lfs, &regular, opts).await?;
    report.bytes_sent = sent.load(Ordering::Relaxed) + regular.iter().map(|f| f.size).sum::<u64>()
        - lfs
            .iter()
            .filter(|f| report.already_uploaded.contains(&f.path_in_repo))
            .map(|f| f.size)
            .sum::<u64>();
    report.committed = lfs
        .iter()
        .chain(&regular)
        .map(|f| f.path_in_repo.clone())
        .collect();
    report.committed.sort();
    report.commit_url = commit_url;
    report.commit_oid = commit_oid;
    report.pr_url = pr_url;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

struct Hub {
    endpoint: String,
    repo_id: String,
    token: Token,
    http: reqwest::Client,
    hf: HFClient,
    retry: RetryPolicy,
    parallel: usize,
}

#[derive(Debug, Deserialize)]
struct RemoteEntry {
    #[serde(rename = "type")]
    kind: String,
    oid: Option<String>,
    size: Option<u64>,
    lfs: Option<RemoteLfs>,
}

#[derive(Debug, Deserialize)]
struct RemoteLfs {
    oid: Option<String>,
    sha256: Option<String>,
}

impl RemoteEntry {
    fn same_as(&self, f: &UploadFile) -> bool {
        if self.kind != "file" || self.size.is_some_and(|s| s != f.size) {
            return false;
        }
        match &self.lfs {
            Some(l) => l.oid.as_ref().or(l.sha256.as_ref()) == Some(&f.sha256),
            None => f.git_oid.is_some() && self.oid == f.git_oid,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreuploadFile {
    path: String,
    upload_mode: String,
    #[serde(default)]
    should_ignore: bool,
}

#[derive(Debug, Deserialize)]
struct LfsBatch {
    transfer: Option<String>,
    #[serde(default)]
    objects: Vec<LfsObject>,
}

#[derive(Debug, Deserialize)]
struct LfsObject {
    oid: String,
    actions: Option<LfsActions>,
    error: Option<LfsError>,
}

#[derive(Debug, Deserialize)]
struct LfsActions {
    upload: Option<LfsAction>,
    verify: Option<LfsAction>,
}

#[derive(Debug, Deserialize)]
struct LfsAction {
    href: String,
    #[serde(default)]
    header: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
struct LfsError {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What a request sends, rebuilt for every attempt.
enum Body<'a> {
    Json(&'a Value),
    Bytes(&'a [u8], &'static str),
    /// `len` bytes of a file from `offset`, counted into `sent`.
    File {
        file: &'a UploadFile,
        offset: u64,
        len: u64,
        sent: Option<Arc<AtomicU64>>,
    },
}

impl Hub {
    fn new(opts: &PublishOptions, token: Token, repo_id: &str) -> Result<Hub> {
        let ua = format!("weightsmith/{}; hf-hub/1; rust", env!("CARGO_PKG_VERSION"));
        let http = reqwest::Client::builder()
            .user_agent(ua.clone())
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| Error::Connect {
                endpoint: opts.endpoint.clone(),
                message: e.to_string(),
            })?;
        let hf = HFClient::builder()
            .endpoint(opts.endpoint.clone())
            .token(token.expose().to_string())
            .user_agent(ua)
            .cache_enabled(false)
            .retry_max_attempts(opts.retry.max_attempts.max(1) as usize)
            .retry_base_delay(opts.retry.base_delay)
            .build()
            .map_err(|e| map_hf(e, &opts.endpoint, repo_id, &token, opts.retry))?;
        Ok(Hub {
            endpoint: opts.endpoint.clone(),
            repo_id: repo_id.to_string(),
            token,
            http,
            hf,
            retry: opts.retry,
            parallel: opts.parallel_uploads.max(1),
        })
    }

    fn api(&self, what: &str) -> String {
        format!("{}/api/models/{}/{what}", self.endpoint, self.repo_id)
    }

    fn lfs_batch_url(&self) -> String {
        format!(
            "{}/{}.git/info/lfs/objects/batch",
            self.endpoint, self.repo_id
        )
    }

    fn hf_err(&self, e: HFError) -> Error {
        map_hf(e, &self.endpoint, &self.repo_id, &self.token, self.retry)
    }

    async fn ensure_repo(&self, private: bool) -> Result<String> {
        let url = self
            .hf
            .create_repository()
            .repo_id(&self.repo_id)
            .repo_type(RepoTypeModel)
            .private(private)
            .exist_ok(true)
            .send()
            .await
            .map_err(|e| self.hf_err(e))?;
        Ok(url.url)
    }

    async fn ensure_branch(&self, branch: &str) -> Result<()> {
        let (owner, name) = self.repo_id.split_once('/').expect("validated owner/name");
        let repo = self.hf.model(owner, name);
        let exists = repo
            .revision_exists()
            .revision(branch)
            .send()
            .await
            .map_err(|e| self.hf_err(e))?;
        if !exists {
            match repo.create_branch().branch(branch).send().await {
                Ok(()) | Err(HFError::Conflict { .. }) => {}
                Err(e) => return Err(self.hf_err(e)),
            }
        }
        Ok(())
    }

    /// One request with retries on transient failures; a non-success answer becomes an error.
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        auth: bool,
        headers: &[(String, String)],
        body: Body<'_>,
    ) -> Result<reqwest::Response> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut req = self.http.request(method.clone(), url);
            if auth {
                req = req.bearer_auth(self.token.expose());
            }
            for (k, v) in headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let streamed = Arc::new(AtomicU64::new(0));
            req = match &body {
                Body::Json(v) => req.json(v),
                Body::Bytes(b, ct) => req
                    .header(reqwest::header::CONTENT_TYPE, *ct)
                    .body(b.to_vec()),
                Body::File {
                    file,
                    offset,
                    len,
                    sent,
                } => {
                    let stream =
                        file_stream(file, *offset, *len, streamed.clone(), sent.clone()).await?;
                    req.header(reqwest::header::CONTENT_LENGTH, len.to_string())
                        .body(reqwest::Body::wrap_stream(stream))
                }
            };
            let outcome = req.send().await;
            let retryable = match &outcome {
                Ok(r) => is_transient(r.status()),
                Err(e) => e.is_connect() || e.is_timeout() || e.is_request() || e.is_body(),
            };
            if retryable && attempt < self.retry.max_attempts.max(1) {
                if let Body::File { sent: Some(s), .. } = &body {
                    s.fetch_sub(streamed.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                let mut delay = self.retry.base_delay * 2u32.saturating_pow(attempt - 1);
                if let Ok(r) = &outcome {
                    if let Some(after) = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                    {
                        delay = Duration::from_secs(after);
                    }
                }
                tokio::time::sleep(delay.min(self.retry.max_delay)).await;
                continue;
            }
            return match outcome {
                Ok(r) if r.status().is_success() => Ok(r),
                Ok(r) => Err(self.status_error(r, attempt).await),
                Err(e) => Err(self.transport_error(e, url, attempt)),
            };
        }
    }

    async fn status_error(&self, r: reqwest::Response, attempts: u32) -> Error {
        let status = r.status().as_u16();
        let url = r.url().to_string();
        let header_msg = r
            .headers()
            .get("x-error-message")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = r.text().await.unwrap_or_default();
        let detail = header_msg
            .or_else(|| {
                serde_json::from_str::<Value>(&body).ok().and_then(|v| {
                    v.get("error")
                        .or_else(|| v.get("message"))
                        .and_then(|m| m.as_str().map(str::to_string))
                })
            })
            .unwrap_or_else(|| body.chars().take(300).collect());
        status_to_error(
            status,
            &url,
            &self.endpoint,
            &self.repo_id,
            &self.token.redact(&detail),
            attempts,
        )
    }

    fn transport_error(&self, e: reqwest::Error, url: &str, attempts: u32) -> Error {
        let message = self.token.redact(&error_chain(&e));
        if e.is_connect() {
            Error::Connect {
                endpoint: self.endpoint.clone(),
                message: format!("{message} (after {attempts} attempt(s))"),
            }
        } else {
            Error::Transport {
                url: url.to_string(),
                message: format!("{message} (after {attempts} attempt(s))"),
            }
        }
    }

    async fn paths_info(
        &self,
        revision: &str,
        paths: impl Iterator<Item = String>,
    ) -> Result<HashMap<String, RemoteEntry>> {
        let url = self.api(&format!("paths-info/{}", encode_segment(revision)));
        let paths: Vec<String> = paths.collect();
        let mut out = HashMap::new();
        for chunk in paths.chunks(500) {
            let body = json!({ "paths": chunk, "expand": false });
            let r = self
                .send(reqwest::Method::POST, &url, true, &[], Body::Json(&body))
                .await?;
            let entries: Vec<Value> = r.json().await.map_err(|e| Error::Protocol {
                url: url.clone(),
                message: format!("paths-info answer is not a JSON list: {e}"),
            })?;
            for v in entries {
                let path = v.get("path").and_then(|p| p.as_str()).map(str::to_string);
                if let (Some(path), Ok(entry)) = (path, serde_json::from_value::<RemoteEntry>(v)) {
                    out.insert(path, entry);
                }
            }
        }
        Ok(out)
    }

    async fn preupload(
        &self,
        revision: &str,
        files: &[&UploadFile],
    ) -> Result<HashMap<String, PreuploadFile>> {
        let url = self.api(&format!("preupload/{}", encode_segment(revision)));
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut out = HashMap::new();
        for chunk in files.chunks(250) {
            let body = json!({
                "files": chunk.iter().map(|f| json!({
                    "path": f.path_in_repo,
                    "size": f.size,
                    "sample": b64.encode(&f.sample),
                })).collect::<Vec<_>>()
            });
            let r = self
                .send(reqwest::Method::POST, &url, true, &[], Body::Json(&body))
                .await?;
            #[derive(Deserialize)]
            struct Answer {
                files: Vec<PreuploadFile>,
            }
            let a: Answer = r.json().await.map_err(|e| Error::Protocol {
                url: url.clone(),
                message: format!("unexpected preupload answer: {e}"),
            })?;
            out.extend(a.files.into_iter().map(|f| (f.path.clone(), f)));
        }
        Ok(out)
    }

    async fn lfs_batch(&self, revision: &str, files: &[&UploadFile]) -> Result<LfsBatch> {
        let url = self.lfs_batch_url();
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart", "xet"],
            "objects": files.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": {"name": revision},
        });
        let lfs_headers = [(
            "Accept".to_string(),
            "application/vnd.git-lfs+json".to_string(),
        )];
        let bytes = serde_json::to_vec(&body).expect("json");
        let r = self
            .send(
                reqwest::Method::POST,
                &url,
                true,
                &lfs_headers,
                Body::Bytes(&bytes, "application/vnd.git-lfs+json"),
            )
            .await?;
        r.json().await.map_err(|e| Error::Protocol {
            url,
            message: format!("unexpected LFS batch answer: {e}"),
        })
    }

    async fn upload_lfs(
        &self,
        f: &UploadFile,
        o: &LfsObject,
        transfer: &str,
        sent: &Arc<AtomicU64>,
    ) -> Result<()> {
        let Some(actions) = &o.actions else {
            return Ok(());
        };
        let Some(upload) = &actions.upload else {
            return Ok(());
        };
        let is_part = |k: &str| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit());
        let multipart = transfer == "multipart" && upload.header.keys().any(|k| is_part(k));
        if multipart {
            let chunk: u64 = upload
                .header
                .get("chunk_size")
                .and_then(|v| {
                    v.as_u64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                })
                .filter(|&c| c > 0)
                .ok_or_else(|| Error::Protocol {
                    url: self.lfs_batch_url(),
                    message: format!(
                        "multipart upload of {} without a usable chunk_size",
                        f.path_in_repo
                    ),
                })?;
            let mut parts: Vec<(u64, String)> = upload
                .header
                .iter()
                .filter(|(k, _)| is_part(k))
                .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
                .collect();
            parts.sort();
            let expected = f.size.div_ceil(chunk);
            if parts.len() as u64 != expected {
                return Err(Error::Protocol {
                    url: self.lfs_batch_url(),
                    message: format!(
                        "multipart upload of {}: {} part URLs for {} bytes in {}-byte chunks (expected {expected})",
                        f.path_in_repo,
                        parts.len(),
                        f.size,
                        chunk
                    ),
                });
            }
            let etags: Vec<(u64, String)> =
                futures::stream::iter(parts.into_iter().map(|(n, url)| async move {
                    let offset = (n - 1) * chunk;
                    let len = chunk.min(f.size - offset);
                    let r = self
                        .send(
                            reqwest::Method::PUT,
                            &url,
                            false,
                            &[],
                            Body::File {
                                file: f,
                                offset,
                                len,
                                sent: Some(sent.clone()),
                            },
                        )
                        .await?;
                    let etag = r
                        .headers()
                        .get(reqwest::header::ETAG)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                        .ok_or_else(|| Error::Protocol {
                            url: url.clone(),
                            message: format!(
                                "part {n} of {} was accepted without an ETag",
                                f.path_in_repo
                            ),
                        })?;
                    Ok::<_, Error>((n, etag))
                }))
                .buffer_unordered(self.parallel)
                .try_collect()
                .await?;
            let mut etags = etags;
            etags.sort();
            let completion = json!({
                "oid": f.sha256,
                "parts": etags.iter().map(|(n, e)| json!({"partNumber": n, "etag": e})).collect::<Vec<_>>(),
            });
            let bytes = serde_json::to_vec(&completion).expect("json");
            self.send(
                reqwest::Method::POST,
                &upload.href,
                false,
                &[("Accept".into(), "application/vnd.git-lfs+json".into())],
                Body::Bytes(&bytes, "application/vnd.git-lfs+json"),
            )
            .await?;
        } else {
            let headers: Vec<(String, String)> = upload
                .header
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect();
            self.send(
                reqwest::Method::PUT,
                &upload.href,
                false,
                &headers,
                Body::File {
                    file: f,
                    offset: 0,
                    len: f.size,
                    sent: Some(sent.clone()),
                },
            )
            .await?;
        }
        if let Some(verify) = &actions.verify {
            let headers: Vec<(String, String)> = verify
                .header
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect();
            let body = json!({"oid": f.sha256, "size": f.size});
            self.send(
                reqwest::Method::POST,
                &verify.href,
                true,
                &headers,
                Body::Json(&body),
            )
            .await?;
        }
        Ok(())
    }

    async fn commit(
        &self,
        revision: &str,
        lfs: &[&UploadFile],
        regular: &[&UploadFile],
        opts: &PublishOptions,
    ) -> Result<(Option<String>, Option<String>, Option<String>)> {
        let mut url = self.api(&format!("commit/{}", encode_segment(revision)));
        if opts.create_pr {
            url.push_str("?create_pr=1");
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut body = Vec::new();
        let header = json!({"key": "header", "value": {
            "summary": commit_message(opts),
            "description": opts.commit_description.clone().unwrap_or_default(),
        }});
        body.extend(serde_json::to_vec(&header).expect("json"));
        body.push(b'\n');
        for f in regular {
            let content = f.read_all().map_err(|e| match &f.source {
                Source::File(p) => Error::io(p, e),
                Source::Bytes(_) => Error::io(&f.path_in_repo, e),
            })?;
            if content.len() as u64 != f.size {
                return Err(Error::io(
                    &f.path_in_repo,
                    std::io::Error::other("the file changed after it was hashed"),
                ));
            }
            let line = json!({"key": "file", "value": {
                "content": b64.encode(&content),
                "path": f.path_in_repo,
                "encoding": "base64",
            }});
            body.extend(serde_json::to_vec(&line).expect("json"));
            body.push(b'\n');
        }
        for f in lfs {
            let line = json!({"key": "lfsFile", "value": {
                "path": f.path_in_repo,
                "algo": "sha256",
                "oid": f.sha256,
                "size": f.size,
            }});
            body.extend(serde_json::to_vec(&line).expect("json"));
            body.push(b'\n');
        }
        let r = self
            .send(
                reqwest::Method::POST,
                &url,
                true,
                &[],
                Body::Bytes(&body, "application/x-ndjson"),
            )
            .await?;
        let v: Value = r.json().await.map_err(|e| Error::Protocol {
            url: url.clone(),
            message: format!("unexpected commit answer: {e}"),
        })?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        Ok((s("commitUrl"), s("commitOid"), s("pullRequestUrl")))
    }

    async fn xet_commit(
        &self,
        revision: &str,
        files: &[&UploadFile],
        opts: &PublishOptions,
    ) -> Result<(Option<String>, Option<String>, Option<String>)> {
        let (owner, name) = self.repo_id.split_once('/').expect("validated owner/name");
        let repo = self.hf.model(owner, name);
        let ops: Vec<hf_hub::repository::CommitOperation> = files
            .iter()
            .map(|f| match &f.source {
                Source::File(p) => {
                    hf_hub::repository::CommitOperation::add_file(f.path_in_repo.clone(), p)
                }
                Source::Bytes(b) => hf_hub::repository::CommitOperation::add_bytes(
                    f.path_in_repo.clone(),
                    b.to_vec(),
                ),
            })
            .collect();
        let info = repo
            .create_commit()
            .operations(ops)
            .commit_message(commit_message(opts))
            .maybe_commit_description(opts.commit_description.clone())
            .revision(revision.to_string())
            .create_pr(opts.create_pr)
            .send()
            .await
            .map_err(|e| self.hf_err(e))?;
        Ok((info.commit_url, info.commit_oid, info.pr_url))
    }
}

/// An error and its sources, `: `-separated (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        message.push_str(": ");
        message.push_str(&s.to_string());
        src = s.source();
    }
    message
}

fn commit_message(opts: &PublishOptions) -> String {
    opts.commit_message.clone().unwrap_or_else(|| {
        format!(
            "Upload model with weightsmith {}",
            env!("CARGO_PKG_VERSION")
        )
    })
}

fn is_transient(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// A byte stream of `len` bytes of `f` from `offset`, counting what it yields into
/// `streamed` (this attempt) and `sent` (the whole upload).
async fn file_stream(
    f: &UploadFile,
    offset: u64,
    len: u64,
    streamed: Arc<AtomicU64>,
    sent: Option<Arc<AtomicU64>>,
) -> Result<impl futures::Stream<Item = std::io::Result<tokio_util::bytes::Bytes>> + Send + 'static>
{
    let reader: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>> = match &f.source {
        Source::File(p) => {
            let mut file = tokio::fs::File::open(p)
                .await
                .map_err(|e| Error::io(p, e))?;
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| Error::io(p, e))?;
            Box::pin(file.take(len))
        }
        Source::Bytes(b) => {
            let start = offset as usize;
            let end = (offset + len) as usize;
            Box::pin(std::io::Cursor::new(b[start..end].to_vec()))
        }
    };
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 1 << 20).map(move |chunk| {
        if let Ok(c) = &chunk {
            streamed.fetch_add(c.len() as u64, Ordering::Relaxed);
            if let Some(s) = &sent {
                s.fetch_add(c.len() as u64, Ordering::Relaxed);
            }
        }
        chunk
    });
    Ok(stream)
}

pub(crate) fn status_to_error(
    status: u16,
    url: &str,
    endpoint: &str,
    repo_id: &str,
    detail: &str,
    attempts: u32,
) -> Error {
    let detail = if detail.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", detail.trim())
    };
    match status {
        401 => Error::Unauthorized {
            endpoint: endpoint.to_string(),
            detail,
        },
        403 => Error::Forbidden {
            repo_id: repo_id.to_string(),
            detail,
        },
        404 => Error::NotFound {
            url: url.to_string(),
            detail,
        },
        413 => Error::TooLargeForServer {
            url: url.to_string(),
            detail,
        },
        s if s >= 500 || s == 429 || s == 408 => Error::Server {
            status: s,
            url: url.to_string(),
            attempts,
            detail,
        },
        s => Error::Http {
            status: s,
            url: url.to_string(),
            detail,
        },
    }
}

fn map_hf(e: HFError, endpoint: &str, repo_id: &str, token: &Token, retry: RetryPolicy) -> Error {
    let attempts = retry.max_attempts.max(1);
    // hf-hub's error context type is not exported; its fields are.
    macro_rules! ctx_detail {
        ($c:expr) => {
            token.redact(
                $c.server_message
                    .clone()
                    .unwrap_or_else(|| $c.body.chars().take(300).collect())
                    .as_str(),
            )
        };
    }
    match &e {
        HFError::AuthRequired { context } => status_to_error(
            401,
            &context.url,
            endpoint,
            repo_id,
            &ctx_detail!(context),
            1,
        ),
        HFError::Forbidden { context } => status_to_error(
            403,
            &context.url,
            endpoint,
            repo_id,
            &ctx_detail!(context),
            1,
        ),
        HFError::RepoNotFound { repo_id: r, .. } => Error::NotFound {
            url: format!("{endpoint}/{r}"),
            detail: ": repository not found (or the token cannot see it)".into(),
        },
        HFError::Http { context } => status_to_error(
            context.status.as_u16(),
            &context.url,
            endpoint,
            repo_id,
            &ctx_detail!(context),
            attempts,
        ),
        HFError::RateLimited { context, .. } => status_to_error(
            429,
            &context.url,
            endpoint,
            repo_id,
            &ctx_detail!(context),
            attempts,
        ),
        HFError::Request { source, url } => {
            let message = error_chain(source);
            if source.is_connect() {
                Error::Connect {
                    endpoint: endpoint.to_string(),
                    message: format!("{} (after {attempts} attempt(s))", token.redact(&message)),
                }
            } else {
                Error::Transport {
                    url: url.clone().unwrap_or_else(|| endpoint.to_string()),
                    message: token.redact(&message),
                }
            }
        }
        _ => Error::Hub {
            message: token.redact(&e.to_string()),
        },
    }
}
