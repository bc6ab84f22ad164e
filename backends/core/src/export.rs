//! The C ABI implementation every plugin shares. An architecture crate implements
//! [`Architecture`] and writes `llm_core::export_backend!(MyArch);` — nothing else crosses FFI.

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use crate::backend::LlmBackend;
use burn_ndarray::{NdArray, NdArrayDevice};
use llm_abi::{
    c_string, free_c_string, read_c_str, AbiError, BackendVTable, ErrorCode, ModelHandle, SeqInput,
    SeqOutput, ABI_VERSION,
};
use llm_formats::ModelSource;
use serde::Deserialize;

use crate::attention::KvCache;
use crate::engine::{hand_back_pool, CausalLm, DynEngine, Engine, SeqChunk, StepInput};
use crate::error::{CoreError, Result};
use crate::weights::{LoadCtx, Quantization};

/// The CPU backend: f32 on ndarray.
pub type Cpu = NdArray<f32>;

/// What an architecture crate provides to become a plugin.
pub trait Architecture: 'static {
    /// Plugin name, e.g. `c"llama"`.
    const NAME: &'static CStr;
    /// JSON array of the config `model_type`s served, e.g. `c"[\"llama\"]"`.
    const MODEL_TYPES: &'static CStr;
    type Model<B: LlmBackend>: CausalLm<B>;
    /// Build the model from a source's config and weights.
    fn load<B: LlmBackend>(
        config: &serde_json::Value,
        weights: &LoadCtx<'_, B>,
        opts: &LoadOptions,
    ) -> Result<Self::Model<B>>;
    /// The HF module tree, parameter count and footprint, from config.json alone (no weights).
    /// `what` names the config in errors.
    fn describe(
        config: &serde_json::Value,
        d: &crate::describe::Describer,
        what: &str,
    ) -> Result<crate::describe::Description>;
}

/// The `load` request (see `llm_abi::load_request`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadOptions {
    pub source: PathBuf,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_quantization")]
    pub quantization: String,
    /// 0 = the model's own context length.
    #[serde(default)]
    pub max_context: usize,
    /// Sequences run at once: slots of the KV-cache pool a backend with one plans at load
    /// ([`crate::attention::KvPool`]); 0 = no pool.
    #[serde(default)]
    pub max_batch: usize,
    /// Where compiled kernels and autotune results persist across processes (CUDA only).
    #[serde(default)]
    pub kernel_cache: Option<PathBuf>,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_quantization() -> String {
    "none".into()
}

impl LoadOptions {
    /// Cap the model's own context by the load option.
    pub fn context(&self, model_max: usize) -> usize {
        if self.max_context == 0 {
            model_max
        } else {
            self.max_context.min(model_max)
        }
    }
}

/// `auto|nf4|none` of a load or describe request, for a source that is (or is not) a
/// pre-quantized bnb checkpoint or a GGUF file.
fn resolve_quantization(q: &str, prequantized: bool, is_gguf: bool) -> Result<Quantization> {
    Ok(match q {
        "none" => Quantization::None,
        "nf4" => Quantization::Nf4,
        // The seed's recipe for float checkpoints; quantized sources stay as they are (bnb NF4
        // stays NF4, GGUF blocks are dequantized to the compute dtype).
        "auto" if prequantized => Quantization::Nf4,
        "auto" if is_gguf => Quantization::None,
        "auto" => Quantization::Nf4,
        other => {
            return Err(CoreError::invalid(format!(
                "quantization `{other}` is not one of auto, nf4, none"
            )))
        }
    })
}

/// The `describe` request (see `llm_abi::describe_request`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescribeOptions {
    pub config: serde_json::Value,
    #[serde(default = "default_format")]
    pub format: String,
    #[serde(default = "default_quantization")]
    pub quantization: String,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub source: String,
}

fn default_format() -> String {
    "hf".into()
}

/// Describe a model from its config: `print(model)`, parameters, footprint, and what it would
/// take on the requested device.
pub fn describe<A: Architecture>(request_json: &str) -> Result<serde_json::Value> {
    use llm_abi::describe_response as r;
    let opts: DescribeOptions = serde_json::from_str(request_json)
        .map_err(|e| CoreError::invalid(format!("describe request: {e}")))?;
    let what = if opts.source.is_empty() {
        "config.json"
    } else {
        &opts.source
    };
    let prequantized = crate::config::BnbConfig::parse(&opts.config, what)?.is_some();
    let quantization =
        resolve_quantization(&opts.quantization, prequantized, opts.format == "gguf")?;
    let d = A::describe(
        &opts.config,
        &crate::describe::Describer {
            quantized: quantization == Quantization::Nf4,
        },
        what,
    )?;
    let (float_bytes, (free, total)) = match opts.device.as_str() {
        "cpu" => (4, host_memory()),
        #[cfg(feature = "cuda")]
        spec if crate::cuda::parse_device(spec).is_some() => {
            (2, crate::cuda::device_memory(spec).unwrap_or((None, None)))
        }
        other => return Err(unknown_device(other)),
    };
    Ok(serde_json::json!({
        r::MODULE_TREE: d.tree.render(),
        r::NUM_PARAMS: d.tree.num_params(),
        r::FOOTPRINT_BYTES: d.tree.footprint(2),
        r::FOOTPRINT_TEXT: crate::describe::footprint_text(d.tree.footprint(2)),
        r::QUANTIZATION: quantization.name(),
        r::WEIGHT_BYTES: d.tree.device_bytes(float_bytes),
        r::KV_BYTES_PER_TOKEN: d.kv_values_per_token * float_bytes,
        r::MAX_POSITION_EMBEDDINGS: d.max_position_embeddings,
        r::DEVICE_FREE_BYTES: free,
        r::DEVICE_TOTAL_BYTES: total,
    }))
}

/// Host memory (MemAvailable, MemTotal) from /proc/meminfo, where there is one.
fn host_memory() -> (Option<u64>, Option<u64>) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    (field("MemAvailable:"), field("MemTotal:"))
}

fn unknown_device(other: &str) -> CoreError {
    CoreError::invalid(format!(
        "device `{other}` is not one of {}",
        if cfg!(feature = "cuda") {
            "cpu, cuda, cuda:N"
        } else {
            "cpu (this build has no CUDA)"
        }
    ))
}

/// Open the source and build an engine on the requested device.
pub fn load_engine<A: Architecture>(request_json: &str) -> Result<Box<dyn DynEngine>> {
    let started = std::time::Instant::now();
    let opts: LoadOptions = serde_json::from_str(request_json)
        .map_err(|e| CoreError::invalid(format!("load request: {e}")))?;
    let source = ModelSource::open(&opts.source)?;
    let prequantized = crate::config::BnbConfig::parse(source.config(), &source.describe())?;
    let is_gguf = matches!(source, ModelSource::Gguf { .. });
    let quantization = resolve_quantization(&opts.quantization, prequantized.is_some(), is_gguf)?;
    let model_type = source.model_type()?;
    let served: Vec<String> = serde_json::from_str(A::MODEL_TYPES.to_str().unwrap_or("[]"))
        .map_err(|e| CoreError::internal(format!("plugin model types: {e}")))?;
    if !served.contains(&model_type) {
        return Err(CoreError::invalid(format!(
            "{}: model_type `{model_type}` is not served by the {} plugin",
            source.describe(),
            A::NAME.to_string_lossy()
        )));
    }
    match opts.device.as_str() {
        "cpu" => build::<A, Cpu>(&source, NdArrayDevice::Cpu, quantization, &opts, started),
        #[cfg(feature = "cuda")]
        spec if crate::cuda::parse_device(spec).is_some() => {
            let device = crate::cuda::parse_device(spec).expect("checked");
            crate::cuda::use_kernel_cache(opts.kernel_cache.as_deref());
            crate::cuda::read_env();
            crate::cuda::probe_mma(&device);
            build::<A, crate::cuda::CudaBf16>(&source, device, quantization, &opts, started)
        }
        other => Err(unknown_device(other)),
    }
}

fn build<A: Architecture, B: LlmBackend>(
    source: &ModelSource,
    device: B::Device,
    quantization: Quantization,
    opts: &LoadOptions,
    started: std::time::Instant,
) -> Result<Box<dyn DynEngine>> {
    let ctx = LoadCtx {
        store: source.tensors(),
        device: device.clone(),
        quantization,
        source: source.describe(),
        timers: Default::default(),
    };
    // A load that panicked on this thread left its queued copies' group behind: let them end
    // (and forget their failure) before this load's are counted.
    let _ = B::finish_uploads(&device);
    let t0 = std::time::Instant::now();
    // Opening the source and, on CUDA, the plugin's device runtime (its first load in a
    // process starts CubeCL's client and runs the MMA probe).
    let prepare_ms = t0.duration_since(started).as_millis() as u64;
    // Weights go to the pool's persistent part (one exact-size slice each): they live as long
    // as the model, and the activations allocated per op then search pools without them.
    let model = B::memory_persistent_allocations(&device, (), |()| {
        A::load::<B>(source.config(), &ctx, opts)
    });
    // The weights' copies the load queued end here, whether or not it succeeded (a failed
    // load's buffers are freed below); the load's own error first.
    let t_wait = std::time::Instant::now();
    let uploaded = B::finish_uploads(&device);
    let upload_wait_ms = t_wait.elapsed().as_millis() as u64;
    let model = match model.and_then(|m| uploaded.map(|()| m)) {
        Ok(model) => model,
        Err(e) => {
            // A failed load (corrupt tensor, bad shape) leaves nothing behind either.
            hand_back_pool::<B>(&device);
            return Err(e);
        }
    };
    // Until the last queued copy ended: what the model's weights cost to put on the device.
    let weights_ms = t0.elapsed().as_millis() as u64;
    let t1 = std::time::Instant::now();
    if B::JIT {
        let (decode_rows, prompt_rows) = match quantization {
            Quantization::Nf4 => (B::WARM_UP_NF4_DECODE_ROWS, B::WARM_UP_NF4_PROMPT_ROWS),
            Quantization::None => (4, &[][..]),
        };
        warm_up(&model, decode_rows, prompt_rows);
    }
    // Hand back what the load and warm-up used only transiently (host-side conversions
    // uploaded once, warm-up activations).
    hand_back_pool::<B>(&device);
    let warm_up_ms = t1.elapsed().as_millis() as u64;
    let info = serde_json::json!({
        "architecture": A::NAME.to_string_lossy(),
        "model_type": source.model_type()?,
        "device": opts.device,
        "dtype": B::DTYPE,
        "quantization": quantization.name(),
        "load_ms": {"prepare": prepare_ms, "weights": weights_ms, "upload_wait": upload_wait_ms,
                    "warm_up": warm_up_ms,
                    "of_weights": ctx.timers.to_json()},
    });
    Ok(Box::new(Engine::new(model, info)))
}

/// Run the common shapes once so the first request does not pay for compiling them: a
/// 32-token prefill chunk (the elementwise kernels, and the prefill matmuls' autotune bucket)
/// and decode steps at batch 1 to `decode_rows` ([`LlmBackend::WARM_UP_NF4_DECODE_ROWS`] for
/// NF4 models, CUDA: 16, every row count the fused GEMV serves, each compiled on its own; 4
/// for float models, whose Burn matmuls autotune per row count: warming batches 8 and 16 of
/// those made a tiny model's load take minutes), then prompt chunks of `prompt_rows`
/// ([`LlmBackend::WARM_UP_NF4_PROMPT_ROWS`]) and two steps of several sequences with ragged
/// row counts. Longer chunks and new attention lengths still
/// autotune on first use. The kernel cache (`--kernel-cache`) keeps all of it for the next
/// process.
fn warm_up<B: LlmBackend, M: CausalLm<B>>(model: &M, decode_rows: usize, prompt_rows: &[usize]) {
    let layers = model.num_layers();
    let run = |chunks: &[usize]| {
        let tokens: Vec<Vec<u32>> = chunks.iter().map(|&n| vec![0u32; n]).collect();
        let mut caches: Vec<KvCache<B>> = chunks.iter().map(|_| KvCache::new(layers)).collect();
        let mut batch = SeqChunk::zip(tokens.iter().map(Vec::as_slice), &mut caches);
        // The argmax a greedy step takes on the device (`Engine::step_batch`): Burn's reduce
        // autotunes per row-count bucket (run 18: 0.3-0.75 s at first use).
        let _ = model.forward_batch(&mut batch, false).argmax(1).into_data();
    };
    run(&[32.min(model.max_context())]);
    for &rows in prompt_rows {
        run(&[rows.min(model.max_context())]);
    }
    if !prompt_rows.is_empty() {
        // Steps as serving meets them: several sequences, row counts no tile size divides
        // (Burn's matmul compiles its partial-tile variants on first use: after a cold load
        // run 18 saw three compiles in the first such steps), chunks attended together beside
        // decode rows (on CUDA up to 512 rows per chunk, `POOLED_ROWS_MAX_CHUNK`).
        let most = model.max_context();
        run(&[40.min(most), 40.min(most), 17.min(most)]);
        run(&[97.min(most), 1, 1]);
    }
    for rows in 1..=decode_rows {
        run(&vec![1; rows]);
    }
}

/// Run `f`, turning errors and panics into an [`AbiError`] and a return code.
fn guard(err: *mut AbiError, f: impl FnOnce() -> Result<()>) -> i32 {
    let result = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(CoreError::internal(format!("plugin panicked: {msg}")))
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            if !err.is_null() {
                // SAFETY: the caller passes a valid, writable AbiError slot.
                unsafe {
                    (*err).code = e.code as i32;
                    (*err).message = c_string(&e.message);
                }
            }
            if e.code == ErrorCode::Ok {
                ErrorCode::Internal as i32
            } else {
                e.code as i32
            }
        }
    }
}

unsafe fn engine<'a>(model: *mut ModelHandle) -> Result<&'a mut Box<dyn DynEngine>> {
    (model as *mut Box<dyn DynEngine>)
        .as_mut()
        .ok_or_else(|| CoreError::invalid("null model handle"))
}

unsafe extern "C" fn ffi_load<A: Architecture>(
    request_json: *const c_char,
    out: *mut *mut ModelHandle,
    err: *mut AbiError,
) -> i32 {
    guard(err, || {
        let req = read_c_str(request_json)
            .ok_or_else(|| CoreError::invalid("load request is not a UTF-8 C string"))?;
        let engine = load_engine::<A>(req)?;
        *out = Box::into_raw(Box::new(engine)) as *mut ModelHandle;
        Ok(())
    })
}

unsafe extern "C" fn ffi_describe<A: Architecture>(
    request_json: *const c_char,
    out: *mut *mut c_char,
    err: *mut AbiError,
) -> i32 {
    guard(err, || {
        let req = read_c_str(request_json)
            .ok_or_else(|| CoreError::invalid("describe request is not a UTF-8 C string"))?;
        *out = c_string(&describe::<A>(req)?.to_string());
        Ok(())
    })
}

unsafe extern "C" fn ffi_info(
    model: *mut ModelHandle,
    out: *mut *mut c_char,
    err: *mut AbiError,
) -> i32 {
    guard(err, || {
        let info = engine(model)?.info();
        *out = c_string(&info.to_string());
        Ok(())
    })
}

unsafe extern "C" fn ffi_step(
    model: *mut ModelHandle,
    inputs: *const SeqInput,
    n: usize,
    outputs: *mut SeqOutput,
    err: *mut AbiError,
) -> i32 {
    guard(err, || {
        let engine = engine(model)?;
        if n == 0 {
            return Ok(());
        }
        let raw = std::slice::from_raw_parts(inputs, n);
        let outs = std::slice::from_raw_parts_mut(outputs, n);
        let inputs: Vec<StepInput<'_>> = raw
            .iter()
            .map(|r| StepInput {
                seq_id: r.seq_id,
                tokens: if r.n_tokens == 0 {
                    &[]
                } else {
                    std::slice::from_raw_parts(r.tokens, r.n_tokens)
                },
                sample: r.sample != 0,
                params: r.params,
            })
            .collect();
        engine.step(&inputs, outs)
    })
}

unsafe extern "C" fn ffi_release(model: *mut ModelHandle, seq_id: u64) {
    let _ = guard(std::ptr::null_mut(), || {
        engine(model)?.release(seq_id);
        Ok(())
    });
}

unsafe extern "C" fn ffi_destroy(model: *mut ModelHandle) {
    let _ = guard(std::ptr::null_mut(), || {
        if !model.is_null() {
            Box::from_raw(model as *mut Box<dyn DynEngine>).destroy();
        }
        Ok(())
    });
}

unsafe extern "C" fn ffi_free_string(s: *mut c_char) {
    free_c_string(s)
}

/// The vtable of architecture `A`.
pub const fn vtable<A: Architecture>() -> BackendVTable {
    BackendVTable {
        abi_version: ABI_VERSION,
        vtable_size: std::mem::size_of::<BackendVTable>(),
        name: A::NAME.as_ptr(),
        model_types: A::MODEL_TYPES.as_ptr(),
        load: ffi_load::<A>,
        info: ffi_info,
        describe: ffi_describe::<A>,
        step: ffi_step,
        release: ffi_release,
        destroy: ffi_destroy,
        free_string: ffi_free_string,
    }
}

/// Export architecture `$arch` as this cdylib's plugin entry point.
#[macro_export]
macro_rules! export_backend {
    ($arch:ty) => {
        /// The plugin entry point (see `llm_abi::ENTRY_SYMBOL`). Behind the arch crate's `plugin`
        /// feature, so several architectures can be linked into one binary as rlibs.
        #[cfg(feature = "plugin")]
        #[no_mangle]
        pub extern "C" fn llm_backend_entry_v2() -> *const $crate::abi::BackendVTable {
            static VTABLE: $crate::abi::BackendVTable = $crate::export::vtable::<$arch>();
            &VTABLE
        }
    };
}
