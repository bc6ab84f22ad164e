//! Hub ids (`org/name`, `org/name@revision`) as model sources, resolved through `hf-hub` into the
//! standard HF cache: `$HF_HOME/hub/models--org--name/snapshots/<commit>/…` (default
//! `~/.cache/huggingface`), so files the Python tools downloaded are reused and vice versa.
//! HF_TOKEN (or the token file `huggingface-cli login` writes) authorizes gated repos;
//! HF_HUB_OFFLINE=1 reads the cache only; HF_ENDPOINT points at a mirror.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use llm_abi::ErrorCode;

use crate::error::{Result, ServerError};

/// A hub reference parsed from a source string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// `org/name[@revision]`, for a source that is not an existing local path.
    pub fn parse(source: &str) -> Option<HubId> {
        if Path::new(source).exists() {
            return None;
        }
        let (repo, revision) = match source.split_once('@') {
            // A branch, tag or commit; it names a file under refs/ in the cache, so no `..`.
            Some((r, rev))
                if !rev.is_empty()
                    && !rev.contains("..")
                    && !rev.starts_with('/')
                    && rev.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
                    }) =>
            {
                (r, rev)
            }
            Some(_) => return None,
            None => (source, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (part_ok(org) && part_ok(name)).then(|| HubId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// Download progress of one load, read by ListModels.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// hf-hub's per-file callback, adding into a shared [`Progress`].
/// The bool: whether the file's size still has to be added to the total (not when the shard
/// index already gave it).
struct FileProgress(Arc<Progress>, bool);

impl hf_hub::api::Progress for FileProgress {
    fn init(&mut self, size: usize, _filename: &str) {
        // hf-hub 0.4.3 calls `init` twice per download; count the size once.
        if std::mem::take(&mut self.1) {
            self.0.total.fetch_add(size as u64, Ordering::Relaxed);
        }
    }
    fn update(&mut self, size: usize) {
        self.0.done.fetch_add(size as u64, Ordering::Relaxed);
    }
    fn finish(&mut self) {}
}

/// huggingface_hub's truthy values, any case.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"))
}

fn hub_error(id: &HubId, file: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::ModelFiles {
        code: ErrorCode::NotFound,
        message: format!("hub {}@{}: {file}: {e}", id.repo, id.revision),
    }
}

/// Fetches files of one repo revision: from the cache when there, else from the hub (unless
/// offline).
/// Every file comes from one commit: the revision is resolved once (a 40-hex revision is a
/// commit already; otherwise the hub's answer, or the cache's ref when offline or unreachable),
/// so a load never mixes a cached config of one commit with weights of another.
struct Fetcher {
    id: HubId,
    /// `<cache>/models--org--name/snapshots/<commit>`.
    snapshot: PathBuf,
    api: Option<hf_hub::api::sync::ApiRepo>,
    progress: Arc<Progress>,
}

impl Fetcher {
    fn new(id: &HubId, progress: Arc<Progress>) -> Result<Fetcher> {
        let cache = Cache::from_env();
        let folder = cache
            .path()
            .join(Repo::model(id.repo.clone()).folder_name());
        let cached_ref = std::fs::read_to_string(folder.join("refs").join(&id.revision))
            .ok()
            .map(|s| s.trim().to_string());
        let is_commit =
            id.revision.len() == 40 && id.revision.chars().all(|c| c.is_ascii_hexdigit());
        let api = if offline() {
            None
        } else {
            let token = std::env::var("HF_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .or_else(|| cache.token());
            Some(
                ApiBuilder::from_env()
                    .with_progress(false)
                    .with_token(token)
                    .build()
                    .map_err(|e| hub_error(id, "client", e))?,
            )
        };
        let commit = if is_commit {
            id.revision.clone()
        } else {
            let online = api.as_ref().and_then(|api| {
                let repo =
                    Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone());
                match api.repo(repo).info() {
                    Ok(info) => Some(info.sha),
                    Err(e) => {
                        tracing::warn!(repo = %id.repo, error = %e, "hub unreachable; using the cache");
                        None
                    }
                }
            });
            online.or(cached_ref).ok_or_else(|| {
                hub_error(
                    id,
                    "revision",
                    if offline() {
                        "not in the HF cache and HF_HUB_OFFLINE is set"
                    } else {
                        "not found on the hub nor in the HF cache"
                    },
                )
            })?
        };
        let api = api.map(|api| {
            api.repo(Repo::with_revision(
                id.repo.clone(),
                RepoType::Model,
                commit.clone(),
            ))
        });
        Ok(Fetcher {
            id: id.clone(),
            snapshot: folder.join("snapshots").join(&commit),
            api,
            progress,
        })
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        let p = self.snapshot.join(file);
        p.exists().then_some(p)
    }

    /// The file's local path; `Ok(None)` when the repo has no such file.
    fn get(&self, file: &str, required: bool) -> Result<Option<PathBuf>> {
        self.get_counted(file, required, true)
    }

    /// `count`: add the file's size to the progress total.
    fn get_counted(&self, file: &str, required: bool, count: bool) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cached(file) {
            if let Ok(m) = p.metadata() {
                self.progress.done.fetch_add(m.len(), Ordering::Relaxed);
                if count {
                    self.progress.total.fetch_add(m.len(), Ordering::Relaxed);
                }
            }
            return Ok(Some(p));
        }
        let Some(api) = &self.api else {
            return if required {
                Err(hub_error(
                    &self.id,
                    file,
                    "not in the HF cache and HF_HUB_OFFLINE is set",
                ))
            } else {
                Ok(None)
            };
        };
        match api.download_with_progress(file, FileProgress(self.progress.clone(), count)) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if !required && is_404(&e) => {
                Ok(None)
            }
            Err(e) => Err(hub_error(&self.id, file, e)),
        }
    }
}

/// ureq reports an HTTP status as "…: status code 404".
fn is_404(e: &impl std::fmt::Display) -> bool {
    e.to_string().contains("status code 404")
}

/// Fetch what a load needs (config, generation config, tokenizer files, safetensors shards) and
/// return the snapshot directory holding them.
pub fn fetch_model(id: &HubId, progress: Arc<Progress>) -> Result<PathBuf> {
    let f = Fetcher::new(id, progress.clone())?;
    let config = f.get("config.json", true)?.expect("required file");
    for file in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        f.get(file, false)?;
    }
    match f.get("model.safetensors.index.json", false)? {
        Some(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| hub_error(id, "index", e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| hub_error(id, "model.safetensors.index.json", e))?;
            let total = v["metadata"]["total_size"].as_u64();
            if let Some(t) = total {
                progress.total.fetch_add(t, Ordering::Relaxed);
            }
            let shards: std::collections::BTreeSet<&str> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|s| s.as_str()).collect())
                .unwrap_or_default();
            for shard in shards {
                f.get_counted(shard, true, total.is_none())?;
            }
        }
        None => {
            f.get("model.safetensors", true)?;
        }
    }
    Ok(snapshot_dir(&config))
}

/// Fetch config.json alone (describe before download) and return its directory.
pub fn fetch_config(id: &HubId) -> Result<PathBuf> {
    let f = Fetcher::new(id, Arc::default())?;
    let config = f.get("config.json", true)?.expect("required file");
    Ok(snapshot_dir(&config))
}

fn snapshot_dir(config: &Path) -> PathBuf {
    config.parent().map(Path::to_path_buf).unwrap_or_default()
}
