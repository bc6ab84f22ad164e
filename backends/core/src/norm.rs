//! RMSNorm (HF `LlamaRMSNorm`; Gemma's `(1 + w)` variant via `unit_offset`).

use crate::backend::LlmBackend;
use burn_tensor::backend::Backend;
use burn_tensor::Tensor;

use crate::error::Result;
use crate::weights::Weights;

pub struct RmsNorm<B: LlmBackend> {
    /// `[hidden]`, as the checkpoint stores it.
    pub weight: Tensor<B, 1>,
    pub eps: f64,
    /// The norm scales by `1 + weight` (HF `Gemma2RMSNorm`), not by `weight`. Kept apart
    /// rather than folded into the weight at load: HF adds the 1 in f32 and rounds the product
    /// once, and `1 + w` stored in bf16 would lose most of `w`'s bits.
    pub unit_offset: bool,
}

impl<B: LlmBackend> RmsNorm<B> {
    /// Load `<leaf>.weight`.
    pub fn load(
        w: &Weights<B>,
        leaf: &str,
        hidden: usize,
        eps: f64,
        unit_offset: bool,
    ) -> Result<Self> {
        let weight = w.pp(leaf).tensor("weight", [hidden])?;
        Ok(RmsNorm {
            weight,
            eps,
            unit_offset,
        })
    }

    /// `x`: `[tokens, hidden]`. `x * rsqrt(mean(x^2) + eps) * w`, or `* (1 + w)` with
    /// `unit_offset` ([`LlmBackend::rms_norm`]).
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        B::rms_norm(x, self)
    }

    /// `(x + delta, forward(x + delta))`: a residual add and this norm after it
    /// ([`LlmBackend::add_rms_norm`]).
    pub fn forward_residual(
        &self,
        x: Tensor<B, 2>,
        delta: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        B::add_rms_norm(x, delta, self)
    }

    pub fn num_params(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// RMSNorm as Burn ops: `x * rsqrt(mean(x^2) + eps) * w` (or `* (1 + w)`) in the backend's
/// float type (f32 on the CPU, as HF computes it).
pub fn rms_norm_ops<B: Backend>(
    x: Tensor<B, 2>,
    weight: &Tensor<B, 1>,
    eps: f64,
    unit_offset: bool,
) -> Tensor<B, 2> {
    let var = x.clone().powi_scalar(2).mean_dim(1);
    let x = x * var.add_scalar(eps).sqrt().recip();
    let scale = if unit_offset {
        weight.clone().add_scalar(1.0)
    } else {
        weight.clone()
    };
    x * scale.unsqueeze_dim(0)
}
