//! Loading tensors by checkpoint name, candle `VarBuilder` style: `w.pp("model").pp("layers").pp(3)`
//! walks the same dotted path the checkpoint keys use, so struct fields read like the keys and no
//! name remapping table exists outside the GGUF reader.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::backend::LlmBackend;
use burn_tensor::{DType, Tensor, TensorData};
use llm_formats::{StoredDtype, TensorStore};

use crate::error::{CoreError, Result};
use crate::linear::Linear;
use crate::nf4::{FloatSource, Nf4Weight, WeightDtype};

/// How linear weights are held once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// Float weights in the compute dtype (pre-quantized bnb weights are dequantized).
    None,
    /// NF4 with double quantization (bnb `BitsAndBytesConfig(load_in_4bit=True,
    /// bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`): float weights are quantized
    /// at load, pre-quantized ones are kept as stored. lm_head and embeddings stay float.
    Nf4,
}

impl Quantization {
    pub fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Nf4 => "nf4",
        }
    }
}

/// Shared settings of one load.
pub struct LoadCtx<'a, B: LlmBackend> {
    pub store: &'a dyn TensorStore,
    pub device: B::Device,
    pub quantization: Quantization,
    /// Names the source in error messages.
    pub source: String,
    /// Where the load's time goes (reported with the model's info).
    pub timers: LoadTimers,
}

/// Microseconds a load spent per kind of work, summed over tensors.
#[derive(Debug, Default)]
pub struct LoadTimers {
    /// Reading float weights and quantizing them to NF4 (on all cores).
    pub quantize_us: AtomicU64,
    /// Building NF4 linears from quantized weights (device upload).
    pub nf4_upload_us: AtomicU64,
    /// Reading, converting and uploading float tensors (embeddings, lm_head, norms, biases).
    pub float_us: AtomicU64,
}

impl LoadTimers {
    fn add(counter: &AtomicU64, since: Instant) {
        counter.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Milliseconds per kind, for the model's info.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |c: &AtomicU64| c.load(Ordering::Relaxed) / 1000;
        serde_json::json!({
            "quantize": ms(&self.quantize_us),
            "nf4_upload": ms(&self.nf4_upload_us),
            "float_tensors": ms(&self.float_us),
        })
    }
}

impl<B: LlmBackend> LoadCtx<'_, B> {
    /// A float (never quantized) linear layer from a loaded weight `[out, in]`.
    pub fn dense_from(
        &self,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Box<dyn Linear<B>> {
        B::dense_linear(weight, bias)
    }

    /// An NF4 linear layer.
    pub fn nf4(&self, weight: Nf4Weight, bias: Option<Tensor<B, 1>>) -> Box<dyn Linear<B>> {
        B::nf4_linear(weight, bias, &self.device)
    }
}

/// A cursor into the checkpoint at a dotted prefix.
pub struct Weights<'a, B: LlmBackend> {
    ctx: &'a LoadCtx<'a, B>,
    prefix: String,
}

impl<'a, B: LlmBackend> Weights<'a, B> {
    pub fn new(ctx: &'a LoadCtx<'a, B>) -> Self {
        Weights {
            ctx,
            prefix: String::new(),
        }
    }

    /// Descend one level: `pp("model")`, `pp(3)`.
    pub fn pp(&self, name: impl Display) -> Self {
        Weights {
            ctx: self.ctx,
            prefix: self.key(&name.to_string()),
        }
    }

    /// The full checkpoint key of `leaf` under this prefix.
    pub fn key(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    pub fn contains(&self, leaf: &str) -> bool {
        self.ctx.store.contains(&self.key(leaf))
    }

    pub fn device(&self) -> &B::Device {
        &self.ctx.device
    }

    pub fn ctx(&self) -> &LoadCtx<'a, B> {
        self.ctx
    }

    /// Load `leaf` and check its shape. Float tensors go to the device in their stored dtype
    /// and are converted there by Burn to the backend's float type (bf16 weights on a bf16
    /// backend are uploaded as they are); other stored types are converted to f32 first.
    pub fn tensor<const D: usize>(&self, leaf: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let t0 = Instant::now();
        let key = self.key(leaf);
        let raw = self.raw(&key, &shape)?;
        let t = match stored_float_dtype(raw.dtype) {
            Some(dtype) => B::float_from_bytes(raw.data, dtype, shape, &self.ctx.device),
            None => Tensor::from_data(
                TensorData::new(self.ctx.store.f32(&key)?.data, shape.to_vec()),
                &self.ctx.device,
            ),
        };
        LoadTimers::add(&self.ctx.timers.float_us, t0);
        Ok(t)
    }

    /// The stored tensor `key`, its shape checked against the config's, and for float dtypes
    /// its byte length against the shape.
    fn raw(&self, key: &str, shape: &[usize]) -> Result<llm_formats::RawTensor<'a>> {
        if !self.ctx.store.contains(key) {
            return Err(CoreError::invalid(format!(
                "{}: tensor `{key}` is missing",
                self.ctx.source
            )));
        }
        let raw = self.ctx.store.raw(key)?;
        if raw.shape != shape {
            return Err(CoreError::invalid(format!(
                "{}: tensor `{key}` has shape {:?}, the config implies {:?}",
                self.ctx.source, raw.shape, shape
            )));
        }
        if let Some(width) = raw.dtype.float_width() {
            let n: usize = shape.iter().product();
            if raw.data.len() / width != n {
                return Err(CoreError::invalid(format!(
                    "{}: tensor `{key}` holds {} values, its shape {shape:?} needs {n}",
                    self.ctx.source,
                    raw.data.len() / width
                )));
            }
        }
        Ok(raw)
    }

    /// A linear layer `leaf.weight` `[out, in]` (+ `leaf.bias` `[out]` when `bias`), stored as the
    /// load's quantization says.
    pub fn linear(
        &self,
        leaf: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Box<dyn Linear<B>>> {
        let w = self.pp(leaf);
        let key = w.key("weight");
        let store = self.ctx.store;
        let bias = if bias {
            Some(w.tensor("bias", [out_features])?)
        } else {
            if w.contains("bias") {
                return Err(CoreError::invalid(format!(
                    "{}: tensor `{}` exists but the config says this layer has no bias",
                    self.ctx.source,
                    w.key("bias")
                )));
            }
            None
        };
        if Nf4Weight::is_bnb(store, &key) {
            let q = Nf4Weight::from_bnb(store, &key, out_features, in_features, &self.ctx.source)?;
            return Ok(match self.ctx.quantization {
                Quantization::Nf4 => self.ctx.nf4(q, bias),
                Quantization::None => {
                    let t = Tensor::from_data(
                        TensorData::new(q.dequantize(), [out_features, in_features]),
                        &self.ctx.device,
                    );
                    self.ctx.dense_from(t, bias)
                }
            });
        }
        match self.ctx.quantization {
            Quantization::None => {
                let weight = w.tensor("weight", [out_features, in_features])?;
                Ok(self.ctx.dense_from(weight, bias))
            }
            Quantization::Nf4 => {
                let t0 = Instant::now();
                let shape = [out_features, in_features];
                let raw = self.raw(&key, &shape)?;
                let dtype = WeightDtype::of(raw.dtype);
                let q = match FloatSource::stored(raw.dtype, raw.data) {
                    // Converted block by block while quantizing, on all cores.
                    Some(src) => {
                        Nf4Weight::quantize_from(src, out_features, in_features, true, dtype)
                    }
                    // GGUF block types: dequantized (and un-permuted) by the reader first.
                    None => {
                        let t = store.f32(&key)?.data;
                        Nf4Weight::quantize(&t, out_features, in_features, true, dtype)
                    }
                };
                LoadTimers::add(&self.ctx.timers.quantize_us, t0);
                let t1 = Instant::now();
                let linear = self.ctx.nf4(q, bias);
                LoadTimers::add(&self.ctx.timers.nf4_upload_us, t1);
                Ok(linear)
            }
        }
    }

    /// A linear layer without bias that is never quantized (lm_head, as bitsandbytes leaves it).
    pub fn dense(
        &self,
        leaf: &str,
        in_features: usize,
        out_features: usize,
    ) -> Result<Box<dyn Linear<B>>> {
        let weight = self
            .pp(leaf)
            .tensor("weight", [out_features, in_features])?;
        Ok(self.ctx.dense_from(weight, None))
    }
}

/// The Burn dtype of a stored float tensor's bytes (F32, F16 or BF16, little-endian as the
/// host is: x86-64, aarch64); `None` for other stored types (GGUF blocks, integers).
fn stored_float_dtype(dtype: StoredDtype) -> Option<DType> {
    match dtype {
        StoredDtype::F32 => Some(DType::F32),
        StoredDtype::F16 => Some(DType::F16),
        StoredDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}
