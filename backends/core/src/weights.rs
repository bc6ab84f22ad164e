//! Loading tensors by checkpoint name, candle `VarBuilder` style: `w.pp("model").pp("layers").pp(3)`
//! walks the same dotted path the checkpoint keys use, so struct fields read like the keys and no
//! name remapping table exists outside the GGUF reader.

use std::fmt::Display;

use crate::backend::LlmBackend;
use burn_tensor::{Tensor, TensorData};
use llm_formats::TensorStore;

use crate::error::{CoreError, Result};
use crate::linear::Linear;
use crate::nf4::{Nf4Weight, WeightDtype};

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

    /// Load `leaf` as f32 and check its shape.
    pub fn tensor<const D: usize>(&self, leaf: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let key = self.key(leaf);
        if !self.ctx.store.contains(&key) {
            return Err(CoreError::invalid(format!(
                "{}: tensor `{key}` is missing",
                self.ctx.source
            )));
        }
        let t = self.ctx.store.f32(&key)?;
        if t.shape != shape {
            return Err(CoreError::invalid(format!(
                "{}: tensor `{key}` has shape {:?}, the config implies {:?}",
                self.ctx.source, t.shape, shape
            )));
        }
        Ok(Tensor::from_data(
            TensorData::new(t.data, shape.to_vec()),
            &self.ctx.device,
        ))
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
                let t = self.host_f32(&key, &[out_features, in_features])?;
                let dtype = WeightDtype::of(store.raw(&key)?.dtype);
                let q = Nf4Weight::quantize(&t, out_features, in_features, true, dtype);
                Ok(self.ctx.nf4(q, bias))
            }
        }
    }

    /// A tensor's f32 data on the host, shape-checked.
    fn host_f32(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if !self.ctx.store.contains(key) {
            return Err(CoreError::invalid(format!(
                "{}: tensor `{key}` is missing",
                self.ctx.source
            )));
        }
        let t = self.ctx.store.f32(key)?;
        if t.shape != shape {
            return Err(CoreError::invalid(format!(
                "{}: tensor `{key}` has shape {:?}, the config implies {:?}",
                self.ctx.source, t.shape, shape
            )));
        }
        Ok(t.data)
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
