//! Loaded models by name. Loading and unloading run on blocking threads, so they never hold up
//! other models' traffic.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use llm_formats::ModelSource;
use llm_proto::v1::{DescribeModelResponse, DeviceMemory, ModelInfo};
use serde_json::json;
use tonic_health::server::HealthReporter;

use crate::error::{Result, ServerError};
use crate::hub::{self, HubId};
use crate::metrics::{Metrics, ModelGauges};
use crate::plugin::Plugins;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::tokenizer::TextModel;

/// What LoadModel / `--load` asks for.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub name: String,
    pub source: PathBuf,
    pub device: String,
    pub quantization: String,
    pub max_context: u32,
}

pub struct LoadedModel {
    pub info: ModelInfo,
    pub text: Arc<TextModel>,
    scheduler: Scheduler,
    /// The plugin's `describe` of the loaded config (module tree, footprint).
    description: serde_json::Value,
}

/// A load or unload in progress (ListModels shows it next to the ready models).
struct Transition {
    id: u64,
    info: ModelInfo,
    progress: Option<Arc<hub::Progress>>,
}

static NEXT_TRANSITION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

struct TransitionGuard<'a> {
    registry: &'a Registry,
    id: u64,
}

impl Drop for TransitionGuard<'_> {
    fn drop(&mut self) {
        self.registry.end(self.id);
    }
}

/// What DescribeModel with a `source` asks for.
#[derive(Debug, Clone)]
pub struct DescribeSpec {
    pub source: String,
    pub device: String,
    pub quantization: String,
    pub max_context: u32,
    pub max_batch: u32,
}

impl LoadedModel {
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }
}

pub struct Registry {
    plugins: Plugins,
    models: RwLock<BTreeMap<String, Arc<LoadedModel>>>,
    transitions: RwLock<Vec<Transition>>,
    health: HealthReporter,
    /// Batch, queue and chunk settings every model's scheduler gets (max_context per model).
    pub sched: SchedulerConfig,
    pub metrics: Arc<Metrics>,
    /// Directories LoadModel may read from (canonical); empty = anywhere.
    model_roots: Vec<PathBuf>,
    /// Passed to GPU plugins: where compiled kernels and autotune results persist.
    kernel_cache: Option<PathBuf>,
}

/// Model names: what can safely appear in URLs, metrics labels and health service names.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'));
    if ok {
        Ok(())
    } else {
        Err(ServerError::invalid(
            "name",
            format!("{name:?} is not a valid model name (1-128 of letters, digits, '.', '_', '-', ':', '/')"),
        ))
    }
}

/// The health service name of a model.
pub fn health_name(model: &str) -> String {
    format!("llm.v1.LlmService/{model}")
}

impl Registry {
    pub fn new(
        plugins: Plugins,
        health: HealthReporter,
        sched: SchedulerConfig,
        metrics: Arc<Metrics>,
        model_roots: &[PathBuf],
        kernel_cache: Option<PathBuf>,
    ) -> std::result::Result<Registry, String> {
        let model_roots = model_roots
            .iter()
            .map(|r| {
                r.canonicalize()
                    .map_err(|e| format!("--model-root {}: {e}", r.display()))
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(Registry {
            plugins,
            models: RwLock::new(BTreeMap::new()),
            transitions: RwLock::new(Vec::new()),
            health,
            sched,
            metrics,
            model_roots,
            kernel_cache,
        })
    }

    /// A LoadModel source must resolve (symlinks and `..` included) under a model root.
    /// Hub ids are fetched into the HF cache, not read from arbitrary paths: they pass.
    pub fn check_source(&self, source: &std::path::Path) -> Result<()> {
        if self.model_roots.is_empty() || source.to_str().and_then(HubId::parse).is_some() {
            return Ok(());
        }
        let real = source.canonicalize().map_err(|e| ServerError::ModelFiles {
            code: llm_abi::ErrorCode::NotFound,
            message: format!("source {}: {e}", source.display()),
        })?;
        if self.model_roots.iter().any(|r| real.starts_with(r)) {
            Ok(())
        } else {
            Err(ServerError::PermissionDenied(format!(
                "source {} is outside the server's model roots ({})",
                source.display(),
                self.model_roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }

    /// Gauges of every loaded model, for /metrics.
    pub fn gauges(&self) -> Vec<ModelGauges> {
        self.models
            .read()
            .expect("registry lock")
            .values()
            .map(|m| {
                let stats = &m.scheduler.stats;
                let info = m.live_info();
                ModelGauges {
                    queued: stats.queued.load(std::sync::atomic::Ordering::Relaxed),
                    running: stats.running.load(std::sync::atomic::Ordering::Relaxed),
                    max_batch: self.sched.max_batch,
                    weight_bytes: info.weight_bytes,
                    kv_cache_bytes: info.kv_cache_bytes,
                    workspace_bytes: info.workspace_bytes,
                    name: info.name,
                    device: info.device,
                }
            })
            .collect()
    }

    fn names(&self) -> Vec<String> {
        self.models
            .read()
            .expect("registry lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Shutdown: every model NOT_SERVING, then unloaded (streams still running end with
    /// UNAVAILABLE).
    pub async fn unload_all(&self) {
        for name in self.names() {
            let _ = self.unload(&name).await;
        }
    }

    /// Health NOT_SERVING overall and per model (graceful shutdown begins).
    pub async fn set_not_serving(&self) {
        for name in self.names() {
            self.health
                .set_service_status(health_name(&name), tonic_health::ServingStatus::NotServing)
                .await;
        }
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        self.health
            .set_service_status("llm.v1.LlmService", tonic_health::ServingStatus::NotServing)
            .await;
    }

    pub fn get(&self, name: &str) -> Result<Arc<LoadedModel>> {
        self.models
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
            .ok_or_else(|| ServerError::ModelNotFound(name.to_string()))
    }

    /// Ready models with their live memory figures, then loads and unloads in progress.
    pub fn list(&self) -> Vec<ModelInfo> {
        let mut out: Vec<ModelInfo> = self
            .models
            .read()
            .expect("registry lock")
            .values()
            .map(|m| m.live_info())
            .collect();
        for t in self.transitions.read().expect("registry lock").iter() {
            let mut info = t.info.clone();
            if let Some(p) = &t.progress {
                info.download_done_bytes = p.done.load(std::sync::atomic::Ordering::Relaxed);
                info.download_total_bytes = p.total.load(std::sync::atomic::Ordering::Relaxed);
            }
            out.push(info);
        }
        out
    }

    /// List a load or unload in progress until the returned guard drops (also when the
    /// handler's future is dropped: a client that gives up mid-download leaves no stale row).
    fn begin(&self, info: ModelInfo, progress: Option<Arc<hub::Progress>>) -> TransitionGuard<'_> {
        let mut transitions = self.transitions.write().expect("registry lock");
        self.push_transition(&mut transitions, info, progress)
    }

    fn push_transition(
        &self,
        transitions: &mut Vec<Transition>,
        info: ModelInfo,
        progress: Option<Arc<hub::Progress>>,
    ) -> TransitionGuard<'_> {
        let id = NEXT_TRANSITION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        transitions.push(Transition { id, info, progress });
        TransitionGuard { registry: self, id }
    }

    /// [`Registry::begin`] for a load, unless the name is being loaded already: two loads of
    /// one name would both read and upload the weights, and the later one would swap out the
    /// earlier as soon as it is ready. The check and the listing are one step under the lock.
    fn begin_load(
        &self,
        info: ModelInfo,
        progress: Arc<hub::Progress>,
    ) -> Result<TransitionGuard<'_>> {
        let mut transitions = self.transitions.write().expect("registry lock");
        if transitions
            .iter()
            .any(|t| t.info.name == info.name && t.info.state == "loading")
        {
            return Err(ServerError::LoadInProgress(info.name));
        }
        Ok(self.push_transition(&mut transitions, info, Some(progress)))
    }

    fn end(&self, id: u64) {
        self.transitions
            .write()
            .expect("registry lock")
            .retain(|t| t.id != id);
    }

    async fn update_health(&self) {
        let any = !self.models.read().expect("registry lock").is_empty();
        let h = &self.health;
        let status = if any {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        h.set_service_status("", status).await;
        h.set_service_status("llm.v1.LlmService", status).await;
    }

    /// Load `spec.name`. A name already served from another source is swapped atomically: the
    /// new model takes new requests from the moment it is ready, the old one finishes what it
    /// was given and is then freed (in the background; ListModels shows it "unloading").
    pub async fn load(self: &Arc<Self>, spec: LoadSpec) -> Result<(ModelInfo, f64)> {
        check_name(&spec.name)?;
        if let Some(m) = self.models.read().expect("registry lock").get(&spec.name) {
            if m.info.source == spec.source.display().to_string() {
                return Err(ServerError::ModelExists(spec.name));
            }
        }
        let t0 = Instant::now();
        let progress = Arc::new(hub::Progress::default());
        let loading = self.begin_load(
            ModelInfo {
                name: spec.name.clone(),
                source: spec.source.display().to_string(),
                state: "loading".into(),
                device: spec.device.clone(),
                quantization: spec.quantization.clone(),
                ..Default::default()
            },
            progress.clone(),
        )?;
        let this = self.clone();
        let name = spec.name.clone();
        let loaded = tokio::task::spawn_blocking(move || this.load_blocking(spec, progress)).await;
        drop(loading);
        let loaded = loaded.map_err(|e| ServerError::Internal(format!("load task: {e}")))??;
        let info = loaded.info.clone();
        let old = self
            .models
            .write()
            .expect("registry lock")
            .insert(name.clone(), Arc::new(loaded));
        self.health
            .set_service_status(health_name(&name), tonic_health::ServingStatus::Serving)
            .await;
        self.update_health().await;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(model = %name, ms, swapped = old.is_some(), "model loaded");
        if let Some(old) = old {
            let this = self.clone();
            tokio::spawn(async move { this.retire(old).await });
        }
        Ok((info, ms))
    }

    /// The old side of a swap: wait until no handler still holds it (each submits its request
    /// first), let it finish everything submitted, then free it.
    async fn retire(&self, old: Arc<LoadedModel>) {
        let mut info = old.info.clone();
        info.state = "unloading".into();
        let id = self.begin(info, None);
        sole_owner(&old).await;
        old.scheduler.drain().await;
        drop(old);
        release_freed_memory();
        tracing::info!("swapped-out model freed");
        drop(id);
    }

    fn load_blocking(&self, spec: LoadSpec, progress: Arc<hub::Progress>) -> Result<LoadedModel> {
        let path = match spec.source.to_str().and_then(HubId::parse) {
            Some(id) => hub::fetch_model(&id, progress)?,
            None => spec.source.clone(),
        };
        let source = ModelSource::open(&path)?;
        let is_gguf = matches!(source, ModelSource::Gguf { .. });
        let model_type = source.model_type()?;
        let plugin =
            self.plugins
                .for_model_type(&model_type)
                .ok_or_else(|| ServerError::ModelFiles {
                    code: llm_abi::ErrorCode::Unimplemented,
                    message: format!(
                        "{}: no plugin in {} serves model_type `{model_type}` (available: {})",
                        source.describe(),
                        self.plugins.dir.display(),
                        self.plugins.model_types().join(", ")
                    ),
                })?;
        // The tokenizer is built on a thread of its own while the plugin loads the weights: a
        // hub tokenizer.json is 9 MB of JSON for Llama 3.1, 17 MB for Gemma 2, and
        // `tokenizers` alone takes 0.6 s / 1.4 s to build them on the dev machine's CPU (the
        // 8B loads in ~3 s on an H200). A bad tokenizer still fails the load, naming the file.
        let (text, description, mut model) = std::thread::scope(|scope| {
            let parsing = scope.spawn(|| TextModel::from_source(&source));
            let description = plugin.describe(&json!({
                llm_abi::describe_request::CONFIG: source.config(),
                llm_abi::describe_request::FORMAT: if is_gguf { "gguf" } else { "hf" },
                llm_abi::describe_request::QUANTIZATION: spec.quantization,
                llm_abi::describe_request::DEVICE: spec.device,
                llm_abi::describe_request::SOURCE: source.describe(),
            }))?;
            self.check_plan(&spec, &description)?;
            let model = plugin.load(&json!({
                llm_abi::load_request::SOURCE: path,
                llm_abi::load_request::DEVICE: spec.device,
                llm_abi::load_request::QUANTIZATION: spec.quantization,
                llm_abi::load_request::MAX_CONTEXT: spec.max_context,
                llm_abi::load_request::MAX_BATCH: self.sched.max_batch,
                llm_abi::load_request::KERNEL_CACHE: self.kernel_cache,
            }))?;
            let text = parsing
                .join()
                .map_err(|_| ServerError::Internal("the tokenizer's parse panicked".into()))??;
            Ok::<_, ServerError>((Arc::new(text), description, model))
        })?;
        drop(source);
        let pi = model.info()?;
        if let Some(phases) = pi.get("load_ms") {
            tracing::info!(model = %spec.name, %phases, "plugin load phases (ms)");
        }
        let get_u64 = |k: &str| pi.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let get_str = |k: &str| {
            pi.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let info = ModelInfo {
            name: spec.name.clone(),
            source: spec.source.display().to_string(),
            architecture: plugin.name.clone(),
            state: "ready".into(),
            device: get_str("device"),
            quantization: get_str("quantization"),
            dtype: get_str("dtype"),
            max_context: get_u64("max_context") as u32,
            vocab_size: get_u64("vocab_size") as u32,
            num_parameters: get_u64("num_params"),
            eos_token_ids: text.eos_ids.clone(),
            has_chat_template: text.chat_template.is_some(),
            weight_bytes: get_u64("weight_bytes"),
            ..Default::default()
        };
        let scheduler = Scheduler::start(
            &spec.name,
            model,
            text.clone(),
            SchedulerConfig {
                max_context: info.max_context as usize,
                ..self.sched
            },
            self.metrics.clone(),
        );
        Ok(LoadedModel {
            info,
            text,
            scheduler,
            description,
        })
    }

    pub async fn unload(&self, name: &str) -> Result<()> {
        let model = self
            .models
            .write()
            .expect("registry lock")
            .remove(name)
            .ok_or_else(|| ServerError::ModelNotFound(name.to_string()))?;
        self.health
            .set_service_status(health_name(name), tonic_health::ServingStatus::NotServing)
            .await;
        self.update_health().await;
        let mut info = model.info.clone();
        info.state = "unloading".into();
        let id = self.begin(info, None);
        // Handlers that still hold the entry get UNAVAILABLE from the stopped scheduler.
        model.scheduler.shutdown().await;
        // A handler between `get` and its failed submit still holds the entry (its tokenizer,
        // the description): free all of it before trimming and answering.
        sole_owner(&model).await;
        drop(model);
        release_freed_memory();
        drop(id);
        tracing::info!(model = %name, "model unloaded");
        Ok(())
    }

    /// Memory planned at load: weights plus a KV cache for `--max-batch` sequences of the
    /// model's context (capped by `max_context`) must fit the device's free memory, or the load is
    /// refused up front (RESOURCE_EXHAUSTED) instead of failing mid-request later.
    fn check_plan(&self, spec: &LoadSpec, d: &serde_json::Value) -> Result<()> {
        use llm_abi::describe_response as r;
        let get = |k: &str| d.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let model_ctx = get(r::MAX_POSITION_EMBEDDINGS);
        let ctx = match spec.max_context as u64 {
            0 => model_ctx,
            n => n.min(model_ctx),
        };
        let batch = self.sched.max_batch as u64;
        let weights = get(r::WEIGHT_BYTES);
        let kv = get(r::KV_BYTES_PER_TOKEN) * ctx * batch;
        let Some(free) = d.get(r::DEVICE_FREE_BYTES).and_then(|v| v.as_u64()) else {
            return Ok(());
        };
        tracing::info!(model = %spec.name, weights, kv, free, "memory plan");
        if weights + kv > free {
            return Err(ServerError::ResourceExhausted(format!(
                "model `{}` needs {:.1} MB on {} (weights {:.1} MB + KV cache {:.1} MB for {batch} sequences x {ctx} positions) but {:.1} MB are free: lower --max-batch or max_context, or use --quantization nf4",
                spec.name,
                (weights + kv) as f64 / 1e6,
                spec.device,
                weights as f64 / 1e6,
                kv as f64 / 1e6,
                free as f64 / 1e6
            )));
        }
        Ok(())
    }

    /// DescribeModel of a loaded model: its description and the memory it holds now.
    pub fn describe_loaded(&self, name: &str) -> Result<DescribeModelResponse> {
        let m = self.get(name)?;
        let info = m.live_info();
        let mut r = description_response(&m.description, &info.architecture, &info.device);
        r.memory = Some(memory(
            info.weight_bytes,
            info.kv_cache_bytes,
            info.workspace_bytes,
        ));
        Ok(r)
    }

    /// DescribeModel of a source: from its config alone (a hub id fetches config.json only),
    /// with the memory a load would take and whether it fits the device now.
    pub fn describe_source(&self, spec: DescribeSpec) -> Result<DescribeModelResponse> {
        let (config, format, what) = match HubId::parse(&spec.source) {
            Some(id) => {
                let dir = hub::fetch_config(&id)?;
                (
                    read_config(&dir.join("config.json"))?,
                    "hf",
                    spec.source.clone(),
                )
            }
            None => {
                let path = std::path::Path::new(&spec.source);
                self.check_source(path)?;
                if path.is_dir() {
                    let file = path.join("config.json");
                    (read_config(&file)?, "hf", file.display().to_string())
                } else {
                    // A GGUF file: the config comes from its metadata (the header only).
                    let source = ModelSource::open(path)?;
                    (source.config().clone(), "gguf", source.describe())
                }
            }
        };
        let model_type = llm_formats::model_type_of(&config, &what)?;
        let plugin =
            self.plugins
                .for_model_type(&model_type)
                .ok_or_else(|| ServerError::ModelFiles {
                    code: llm_abi::ErrorCode::Unimplemented,
                    message: format!(
                        "{what}: no plugin serves model_type `{model_type}` (available: {})",
                        self.plugins.model_types().join(", ")
                    ),
                })?;
        let d = plugin.describe(&json!({
            llm_abi::describe_request::CONFIG: config,
            llm_abi::describe_request::FORMAT: format,
            llm_abi::describe_request::QUANTIZATION: spec.quantization,
            llm_abi::describe_request::DEVICE: spec.device,
            llm_abi::describe_request::SOURCE: what,
        }))?;
        let get = |k: &str| d.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        use llm_abi::describe_response as r;
        let model_ctx = get(r::MAX_POSITION_EMBEDDINGS) as u32;
        let max_context = match spec.max_context {
            0 => model_ctx,
            n => n.min(model_ctx),
        };
        let max_batch = match spec.max_batch {
            0 => self.sched.max_batch as u32,
            n => n,
        };
        let kv = get(r::KV_BYTES_PER_TOKEN) * max_context as u64 * max_batch as u64;
        let mut out = description_response(&d, &plugin.name, &spec.device);
        let mem = memory(get(r::WEIGHT_BYTES), kv, 0);
        out.device_free_bytes = get(r::DEVICE_FREE_BYTES);
        out.device_total_bytes = get(r::DEVICE_TOTAL_BYTES);
        out.fits = mem.total <= out.device_free_bytes;
        out.memory = Some(mem);
        out.max_context = max_context;
        out.max_batch = max_batch;
        Ok(out)
    }

    /// Initial health: NOT_SERVING until a model is loaded.
    pub async fn init_health(&self) {
        self.update_health().await;
    }
}

impl LoadedModel {
    /// The info with the scheduler's live KV cache and workspace figures.
    pub fn live_info(&self) -> ModelInfo {
        let stats = &self.scheduler.stats;
        ModelInfo {
            kv_cache_bytes: stats
                .kv_cache_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            workspace_bytes: stats
                .workspace_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            ..self.info.clone()
        }
    }
}

fn read_config(file: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(file).map_err(|e| ServerError::ModelFiles {
        code: llm_abi::ErrorCode::NotFound,
        message: format!("{}: {e}", file.display()),
    })?;
    serde_json::from_str(&text).map_err(|e| ServerError::ModelFiles {
        code: llm_abi::ErrorCode::InvalidArgument,
        message: format!("{}: {e}", file.display()),
    })
}

fn memory(weights: u64, kv_cache: u64, workspace: u64) -> DeviceMemory {
    DeviceMemory {
        weights,
        kv_cache,
        workspace,
        total: weights + kv_cache + workspace,
    }
}

/// The parts of a DescribeModel answer the plugin's `describe` gives.
fn description_response(
    d: &serde_json::Value,
    architecture: &str,
    device: &str,
) -> DescribeModelResponse {
    use llm_abi::describe_response as r;
    let text = |k: &str| {
        d.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    DescribeModelResponse {
        architecture: architecture.to_string(),
        module_tree: text(r::MODULE_TREE),
        num_parameters: d.get(r::NUM_PARAMS).and_then(|v| v.as_u64()).unwrap_or(0),
        footprint_bytes: d
            .get(r::FOOTPRINT_BYTES)
            .and_then(|v| v.as_u64())
            .unwrap_or(0),
        footprint_text: text(r::FOOTPRINT_TEXT),
        quantization: text(r::QUANTIZATION),
        device: device.to_string(),
        ..Default::default()
    }
}

/// Wait until no handler holds `model` but the caller (each drops it once its submit returns;
/// a long prompt's tokenization is the longest hold). Says so if that takes over 5 s.
async fn sole_owner(model: &Arc<LoadedModel>) {
    let t0 = Instant::now();
    let mut warned = false;
    while Arc::strong_count(model) > 1 {
        if !warned && t0.elapsed() > std::time::Duration::from_secs(5) {
            let holders = Arc::strong_count(model) - 1;
            tracing::warn!(
                model = %model.info.name,
                holders,
                "still held by handlers after 5 s; freeing it when they finish"
            );
            warned = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Hand the heap pages a freed model leaves behind back to the OS. glibc keeps freed memory in
/// its per-thread arenas (a model's hundreds of MB of host weights among them), so without this
/// the server's resident memory after an unload depends on which arenas the next load reuses.
/// One thing it cannot return: the free top of a per-thread arena (glibc's `mtrim` madvises
/// free chunks in bins; a thread heap's top shrinks only from `free`, past the trim threshold,
/// which glibc raises up to 64 MB as large blocks are freed). Those thresholds stay glibc's:
/// fixing them lower makes a load's 4-32 MB buffers fresh pages each time (run 14: the GPU
/// machine writes fresh pages at ~0.5 GB/s).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim only returns free pages; it is thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
}
