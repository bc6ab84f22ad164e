//! Loaded models by name. Loading and unloading run on blocking threads, so they never hold up
//! other models' traffic.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use llm_formats::ModelSource;
use llm_proto::v1::ModelInfo;
use serde_json::json;
use tonic_health::server::HealthReporter;

use crate::error::{Result, ServerError};
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
}

impl LoadedModel {
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }
}

pub struct Registry {
    plugins: Plugins,
    models: RwLock<BTreeMap<String, Arc<LoadedModel>>>,
    health: HealthReporter,
    /// Batch, queue and chunk settings every model's scheduler gets (max_context per model).
    pub sched: SchedulerConfig,
    pub metrics: Arc<Metrics>,
    /// Directories LoadModel may read from (canonical); empty = anywhere.
    model_roots: Vec<PathBuf>,
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
            health,
            sched,
            metrics,
            model_roots,
        })
    }

    /// A LoadModel source must resolve (symlinks and `..` included) under a model root.
    pub fn check_source(&self, source: &std::path::Path) -> Result<()> {
        if self.model_roots.is_empty() {
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
            .map(|m| ModelGauges {
                name: m.info.name.clone(),
                queued: m
                    .scheduler
                    .stats
                    .queued
                    .load(std::sync::atomic::Ordering::Relaxed),
                running: m
                    .scheduler
                    .stats
                    .running
                    .load(std::sync::atomic::Ordering::Relaxed),
                max_batch: self.sched.max_batch,
                weight_bytes: m.info.weight_bytes,
                device: m.info.device.clone(),
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

    pub fn list(&self) -> Vec<ModelInfo> {
        self.models
            .read()
            .expect("registry lock")
            .values()
            .map(|m| m.info.clone())
            .collect()
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

    pub async fn load(self: &Arc<Self>, spec: LoadSpec) -> Result<(ModelInfo, f64)> {
        check_name(&spec.name)?;
        if self
            .models
            .read()
            .expect("registry lock")
            .contains_key(&spec.name)
        {
            return Err(ServerError::ModelExists(spec.name));
        }
        let t0 = Instant::now();
        let this = self.clone();
        let name = spec.name.clone();
        let loaded = tokio::task::spawn_blocking(move || this.load_blocking(spec))
            .await
            .map_err(|e| ServerError::Internal(format!("load task: {e}")))??;
        let info = loaded.info.clone();
        {
            let mut models = self.models.write().expect("registry lock");
            if models.contains_key(&name) {
                // A concurrent load of the same name won; this one is dropped (and freed).
                return Err(ServerError::ModelExists(name));
            }
            models.insert(name.clone(), Arc::new(loaded));
        }
        self.health
            .set_service_status(health_name(&name), tonic_health::ServingStatus::Serving)
            .await;
        self.update_health().await;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(model = %name, ms, "model loaded");
        Ok((info, ms))
    }

    fn load_blocking(&self, spec: LoadSpec) -> Result<LoadedModel> {
        let source = ModelSource::open(&spec.source)?;
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
        let text = Arc::new(TextModel::from_source(&source)?);
        drop(source);
        let mut model = plugin.load(&json!({
            llm_abi::load_request::SOURCE: spec.source,
            llm_abi::load_request::DEVICE: spec.device,
            llm_abi::load_request::QUANTIZATION: spec.quantization,
            llm_abi::load_request::MAX_CONTEXT: spec.max_context,
        }))?;
        let pi = model.info()?;
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
        // Handlers that still hold the entry get UNAVAILABLE from the stopped scheduler.
        model.scheduler.shutdown().await;
        tracing::info!(model = %name, "model unloaded");
        Ok(())
    }

    /// Initial health: NOT_SERVING until a model is loaded.
    pub async fn init_health(&self) {
        self.update_health().await;
    }
}
