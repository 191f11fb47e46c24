//! `publish`: a finished checkpoint folder to a Hugging Face Hub repository (through
//! `hub-publish`), or with `dry_run` what would be uploaded, without any network.

use std::path::Path;

use serde::Serialize;

pub use hub_publish::{
    CardOrigin, CardOverrides, CardPolicy, Event as PublishEvent, PublishOptions as HubOptions,
    PublishReport, RetryPolicy, Token,
};

use crate::Result;

/// What to publish where.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// `owner/name`.
    pub repo: String,
    pub hub: HubOptions,
    pub card: CardPolicy,
    pub card_overrides: CardOverrides,
    /// Check and hash, show what would go up, send nothing.
    pub dry_run: bool,
}

impl PublishOptions {
    /// Endpoint and token resolved as `huggingface_hub` does (explicit, then `HF_ENDPOINT` /
    /// `HF_TOKEN`, then the token file).
    pub fn new(repo: impl Into<String>, token: Option<&str>, endpoint: Option<&str>) -> Self {
        PublishOptions {
            repo: repo.into(),
            hub: HubOptions::new(
                hub_publish::resolve_endpoint(endpoint),
                hub_publish::resolve_token(token),
            ),
            card: CardPolicy::default(),
            card_overrides: CardOverrides::default(),
            dry_run: false,
        }
    }
}

/// One file of the folder, as it will be (or was) published.
#[derive(Debug, Clone, Serialize)]
pub struct PublishedFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    /// What the Hub usually makes of it (it decides at upload time).
    pub likely_lfs: bool,
}

/// The version of [`PublishSummary`]'s JSON form (`weightsmith publish --json`, and the
/// `publish` part of `merge --push-to --json`); it changes only when a field changes meaning or
/// goes away.
pub const PUBLISH_SUMMARY_SCHEMA_VERSION: u32 = 1;

/// What [`publish`] did (or, in a dry run, would do).
#[derive(Debug, Clone, Serialize)]
pub struct PublishSummary {
    pub schema_version: u32,
    pub folder: String,
    pub repo: String,
    pub endpoint: String,
    pub revision: String,
    pub dry_run: bool,
    pub files: Vec<PublishedFile>,
    pub total_bytes: u64,
    /// `folder`, `folder_with_repo_id` or `generated`.
    pub card_origin: String,
    /// The README.md that goes up.
    pub card: String,
    pub warnings: Vec<String>,
    /// `None` in a dry run.
    pub report: Option<PublishReport>,
    pub token_source: Option<String>,
}

/// Checks the folder, then publishes it (or, with `dry_run`, only says what would go up).
pub fn publish(
    folder: impl AsRef<Path>,
    options: &PublishOptions,
    progress: &(dyn Fn(PublishEvent) + Sync),
) -> Result<PublishSummary> {
    let folder = folder.as_ref();
    let prepared = hub_publish::prepare(
        folder,
        &options.repo,
        &options.card,
        &options.card_overrides,
        progress,
    )?;
    let report = if options.dry_run {
        None
    } else {
        Some(hub_publish::publish(&prepared, &options.hub, progress)?)
    };
    Ok(PublishSummary {
        schema_version: PUBLISH_SUMMARY_SCHEMA_VERSION,
        folder: folder.display().to_string(),
        repo: options.repo.clone(),
        endpoint: options.hub.endpoint.clone(),
        revision: options
            .hub
            .revision
            .clone()
            .unwrap_or_else(|| "main".into()),
        dry_run: options.dry_run,
        total_bytes: prepared.total_bytes(),
        files: prepared
            .files
            .iter()
            .map(|f| PublishedFile {
                path: f.path_in_repo.clone(),
                bytes: f.size,
                sha256: f.sha256.clone(),
                likely_lfs: f.likely_lfs(),
            })
            .collect(),
        card_origin: match prepared.card_origin {
            CardOrigin::Folder => "folder",
            CardOrigin::FolderWithRepoId => "folder_with_repo_id",
            CardOrigin::Generated => "generated",
        }
        .into(),
        card: prepared.card.clone(),
        warnings: prepared.warnings.clone(),
        report,
        token_source: options.hub.token.as_ref().map(|t| t.source().to_string()),
    })
}

impl PublishSummary {
    /// The text the CLI prints.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let gb = |b: u64| b as f64 / 1e9;
        if self.dry_run {
            let _ = writeln!(
                s,
                "dry run: would publish {} ({} files, {:.3} GB) to {}/{} at {}; nothing was sent",
                self.folder,
                self.files.len(),
                gb(self.total_bytes),
                self.endpoint,
                self.repo,
                self.revision
            );
            for f in &self.files {
                let _ = writeln!(
                    s,
                    "  {:<48} {:>14} bytes  {}",
                    f.path,
                    f.bytes,
                    if f.likely_lfs { "lfs" } else { "regular" }
                );
            }
            let _ = writeln!(s, "README.md ({}):\n{}", self.card_origin, self.card);
        } else if let Some(r) = &self.report {
            if r.committed.is_empty() {
                let _ = writeln!(
                    s,
                    "{}/{} at {} already has all {} files with the same content; nothing uploaded, no commit",
                    self.endpoint,
                    self.repo,
                    r.revision,
                    r.unchanged.len()
                );
            } else {
                let _ = writeln!(
                    s,
                    "published {} file(s) to {} at {} in {:.1} s: {:.3} GB sent{}{}",
                    r.committed.len(),
                    r.repo_url,
                    r.revision,
                    r.seconds,
                    gb(r.bytes_sent),
                    r.transfer
                        .as_deref()
                        .map(|t| format!(" ({t} transfer)"))
                        .unwrap_or_default(),
                    if r.unchanged.is_empty() {
                        String::new()
                    } else {
                        format!(", {} unchanged file(s) skipped", r.unchanged.len())
                    }
                );
                for f in &r.committed {
                    let _ = writeln!(s, "  {f}");
                }
                if !r.already_uploaded.is_empty() {
                    let _ = writeln!(
                        s,
                        "  (already on the server from an earlier run, not sent again: {})",
                        r.already_uploaded.join(", ")
                    );
                }
                if let Some(u) = &r.commit_url {
                    let _ = writeln!(s, "commit: {u}");
                }
                if let Some(u) = &r.pr_url {
                    let _ = writeln!(s, "pull request: {u}");
                }
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}
