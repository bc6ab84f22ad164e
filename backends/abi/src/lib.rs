//! The C ABI between `llm-server` and its architecture plugins.
//!
//! A plugin is a cdylib exporting ONE symbol, [`ENTRY_SYMBOL`], of type [`EntryFn`]. It returns a
//! pointer to a static [`BackendVTable`]; the server checks [`BackendVTable::abi_version`] before
//! touching anything else. Only C types cross this boundary: integers, floats, pointers with
//! lengths, NUL-terminated UTF-8 strings (JSON for rich metadata) and opaque handles.
//!
//! Ownership rules:
//! - Memory is freed by the side that allocated it. Strings the plugin hands out (error messages,
//!   info JSON) are released with [`BackendVTable::free_string`].
//! - Buffers passed into a call (token ids, sampling params, output arrays) belong to the caller and
//!   are only borrowed for the duration of the call.
//! - Every export catches panics: a plugin panic becomes [`ErrorCode::Internal`], never an unwind
//!   across FFI.
//!
//! This crate has no Burn dependency, so the server links none.

use std::ffi::{c_char, CStr, CString};

/// Bumped on any change to the types or function signatures below.
pub const ABI_VERSION: u32 = 2;

/// The one symbol a plugin exports. The version is part of the name so a stale plugin is not even
/// resolved, and the vtable carries [`ABI_VERSION`] as a second check.
pub const ENTRY_SYMBOL: &[u8] = b"llm_backend_entry_v2\0";

/// Signature of [`ENTRY_SYMBOL`].
pub type EntryFn = unsafe extern "C" fn() -> *const BackendVTable;

/// The most top-logprobs a plugin reports per token (OpenAI and vLLM cap at 20 too).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Error categories, mapped one to one onto gRPC status codes by the server.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Ok = 0,
    /// The request or a model file's content is not acceptable (bad config field, bad token id).
    InvalidArgument = 1,
    /// A file the model needs does not exist.
    NotFound = 2,
    /// A model file exists but is truncated or corrupt.
    DataLoss = 3,
    /// Out of memory, out of KV cache, context exceeded.
    ResourceExhausted = 4,
    /// A valid configuration this plugin does not implement (a rope scaling, a quant format).
    Unimplemented = 5,
    /// A bug, including a caught panic.
    Internal = 6,
}

impl ErrorCode {
    pub fn from_i32(v: i32) -> ErrorCode {
        match v {
            0 => ErrorCode::Ok,
            1 => ErrorCode::InvalidArgument,
            2 => ErrorCode::NotFound,
            3 => ErrorCode::DataLoss,
            4 => ErrorCode::ResourceExhausted,
            5 => ErrorCode::Unimplemented,
            _ => ErrorCode::Internal,
        }
    }
}

/// An error as a value: written by the plugin into a caller-provided slot. `message` is a
/// plugin-allocated C string (or null), released with [`BackendVTable::free_string`].
#[repr(C)]
#[derive(Debug)]
pub struct AbiError {
    pub code: i32,
    pub message: *mut c_char,
}

impl AbiError {
    pub const fn ok() -> AbiError {
        AbiError {
            code: 0,
            message: std::ptr::null_mut(),
        }
    }
}

impl Default for AbiError {
    fn default() -> Self {
        Self::ok()
    }
}

/// Opaque model handle owned by the plugin.
#[repr(C)]
pub struct ModelHandle {
    _private: [u8; 0],
}

/// Per-sequence sampling parameters. Defaults reproduce greedy decoding.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// 0 = disabled.
    pub top_k: u32,
    /// 1.0 = disabled; in (0, 1].
    pub top_p: f32,
    /// 0.0 = disabled; in [0, 1).
    pub min_p: f32,
    /// 1.0 = disabled. HF semantics: positive logits of seen tokens divided, negative multiplied.
    pub repetition_penalty: f32,
    /// Seed of the sequence's private RNG, used from its first sampled token on.
    pub seed: u64,
    /// How many top alternatives to report with each token, at most [`MAX_TOP_LOGPROBS`].
    pub top_logprobs: u32,
    /// Non-zero: report the sampled token's logprob (and `top_logprobs` alternatives).
    pub logprobs: u8,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            top_logprobs: 0,
            logprobs: 0,
        }
    }
}

/// One sequence's share of a step. The plugin keeps a KV cache, the token history (for
/// penalties) and an RNG per `seq_id`, created the first time the id is seen and dropped by
/// [`BackendVTable::release`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SeqInput {
    pub seq_id: u64,
    /// The tokens to append: a prefill chunk, or the one token sampled last step.
    pub tokens: *const u32,
    pub n_tokens: usize,
    /// Non-zero: sample a next token after appending (the last chunk of a prefill, or decode).
    pub sample: u8,
    pub params: SamplingParams,
}

/// One sequence's result of a step (only meaningful when its input had `sample != 0`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SeqOutput {
    pub token: u32,
    /// Log-probability of `token` under the model's distribution (before sampling filters, after
    /// penalties), when logprobs were asked for.
    pub logprob: f32,
    pub n_top: u32,
    pub top_ids: [u32; MAX_TOP_LOGPROBS],
    pub top_logprobs: [f32; MAX_TOP_LOGPROBS],
}

impl Default for SeqOutput {
    fn default() -> Self {
        SeqOutput {
            token: 0,
            logprob: 0.0,
            n_top: 0,
            top_ids: [0; MAX_TOP_LOGPROBS],
            top_logprobs: [0.0; MAX_TOP_LOGPROBS],
        }
    }
}

/// The plugin's function table. Every function pointer is non-null.
#[repr(C)]
pub struct BackendVTable {
    /// Must equal [`ABI_VERSION`]; checked before any other field is read.
    pub abi_version: u32,
    /// `size_of::<BackendVTable>()` as the plugin saw it: a second guard against layout drift.
    pub vtable_size: usize,
    /// Static NUL-terminated name, e.g. "llama".
    pub name: *const c_char,
    /// Static NUL-terminated JSON array of the HF `model_type` values (and GGUF
    /// `general.architecture` values) this plugin serves, e.g. `["llama"]`.
    pub model_types: *const c_char,
    /// Load a model. `request_json` is a [`LoadRequest`]-shaped JSON object. On success writes the
    /// handle to `out` and returns 0.
    pub load: unsafe extern "C" fn(
        request_json: *const c_char,
        out: *mut *mut ModelHandle,
        err: *mut AbiError,
    ) -> i32,
    /// Model metadata as a JSON object (architecture, vocab size, context length, parameter count,
    /// memory held). `*out` is freed with `free_string`.
    pub info: unsafe extern "C" fn(
        model: *mut ModelHandle,
        out: *mut *mut c_char,
        err: *mut AbiError,
    ) -> i32,
    /// Describe a model from its config alone (no weights are read): `request_json` is a
    /// [`describe_request`]-shaped JSON object; `*out` gets a [`describe_response`]-shaped one,
    /// freed with `free_string`.
    pub describe: unsafe extern "C" fn(
        request_json: *const c_char,
        out: *mut *mut c_char,
        err: *mut AbiError,
    ) -> i32,
    /// Run one step over a batch of sequences. `outputs` has `n` entries, one per input.
    pub step: unsafe extern "C" fn(
        model: *mut ModelHandle,
        inputs: *const SeqInput,
        n: usize,
        outputs: *mut SeqOutput,
        err: *mut AbiError,
    ) -> i32,
    /// Forget a sequence: drop its KV cache and sampler state. Unknown ids are ignored.
    pub release: unsafe extern "C" fn(model: *mut ModelHandle, seq_id: u64),
    /// Destroy the model: weights and caches dropped, device memory returned to the driver.
    pub destroy: unsafe extern "C" fn(model: *mut ModelHandle),
    /// Free a string this plugin allocated.
    pub free_string: unsafe extern "C" fn(s: *mut c_char),
}

// The vtable only holds pointers to static data and functions.
unsafe impl Sync for BackendVTable {}
unsafe impl Send for BackendVTable {}

/// Allocate a C string on this side of the boundary (replacing interior NULs).
pub fn c_string(s: &str) -> *mut c_char {
    CString::new(s.replace('\0', "\u{FFFD}"))
        .expect("NULs replaced")
        .into_raw()
}

/// Free a string made by [`c_string`] in the same library.
///
/// # Safety
/// `s` must come from [`c_string`] of this very library (or be null).
pub unsafe fn free_c_string(s: *mut c_char) {
    if !s.is_null() {
        drop(CString::from_raw(s));
    }
}

/// Read a borrowed C string.
///
/// # Safety
/// `s` must be null or a valid NUL-terminated string that outlives the returned borrow.
pub unsafe fn read_c_str<'a>(s: *const c_char) -> Option<&'a str> {
    if s.is_null() {
        None
    } else {
        CStr::from_ptr(s).to_str().ok()
    }
}

/// The JSON the server sends to `load`. Kept as plain field names so both sides (serde on each)
/// agree without sharing Rust types across the boundary.
pub mod load_request {
    /// Directory or file the weights come from (an HF directory or a .gguf file).
    pub const SOURCE: &str = "source";
    /// "cpu" or "cuda[:N]".
    pub const DEVICE: &str = "device";
    /// "none" | "nf4" | "auto".
    pub const QUANTIZATION: &str = "quantization";
    /// Upper bound on positions per sequence the KV cache must hold (0 = the model's own).
    pub const MAX_CONTEXT: &str = "max_context";
    /// Sequences the server runs at once (`--max-batch`): a GPU plugin plans a KV-cache pool of
    /// this many slots at load (0: none, each sequence's cache grows on its own).
    pub const MAX_BATCH: &str = "max_batch";
    /// Directory (or null) where a GPU plugin keeps compiled kernels and autotune results
    /// across processes.
    pub const KERNEL_CACHE: &str = "kernel_cache";
}

/// The JSON the server sends to `describe`.
pub mod describe_request {
    /// The parsed config.json (or the config a GGUF's metadata gives).
    pub const CONFIG: &str = "config";
    /// "hf" (a config.json directory) or "gguf".
    pub const FORMAT: &str = "format";
    /// "none" | "nf4" | "auto", as in a load request.
    pub const QUANTIZATION: &str = "quantization";
    /// "cpu" or "cuda[:N]": the compute dtype and whose free memory to report.
    pub const DEVICE: &str = "device";
    /// Names the config in errors.
    pub const SOURCE: &str = "source";
}

/// The JSON `describe` answers.
pub mod describe_response {
    /// `print(model)` of the HF model (transformers 4.48.3), bf16 or bnb NF4.
    pub const MODULE_TREE: &str = "module_tree";
    pub const NUM_PARAMS: &str = "num_params";
    /// `get_memory_footprint()` in bytes.
    pub const FOOTPRINT_BYTES: &str = "footprint_bytes";
    /// The seed's line: `Memory footprint: 5,591.5 MB`.
    pub const FOOTPRINT_TEXT: &str = "footprint_text";
    /// "nf4" or "none": what "auto" resolved to.
    pub const QUANTIZATION: &str = "quantization";
    /// Bytes the weights take on the device as this plugin stores them (NF4 codes + absmax,
    /// other tensors in the compute dtype).
    pub const WEIGHT_BYTES: &str = "weight_bytes";
    /// KV cache bytes one position of one sequence takes, over all layers.
    pub const KV_BYTES_PER_TOKEN: &str = "kv_bytes_per_token";
    pub const MAX_POSITION_EMBEDDINGS: &str = "max_position_embeddings";
    /// The device's free and total memory now (host MemAvailable/MemTotal for "cpu").
    pub const DEVICE_FREE_BYTES: &str = "device_free_bytes";
    pub const DEVICE_TOTAL_BYTES: &str = "device_total_bytes";
}
