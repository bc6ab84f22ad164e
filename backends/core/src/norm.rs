//! RMSNorm (HF `LlamaRMSNorm`; Gemma's `(1 + w)` variant via `unit_offset`).

use crate::backend::LlmBackend;
use burn_tensor::backend::Backend;
use burn_tensor::Tensor;

use crate::error::Result;
use crate::weights::Weights;

pub struct RmsNorm<B: LlmBackend> {
    /// `[hidden]`.
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: LlmBackend> RmsNorm<B> {
    /// Load `<leaf>.weight`. `unit_offset`: the checkpoint stores `w` and the norm scales by
    /// `1 + w` (Gemma); folded in at load so the forward is the same op either way.
    pub fn load(
        w: &Weights<B>,
        leaf: &str,
        hidden: usize,
        eps: f64,
        unit_offset: bool,
    ) -> Result<Self> {
        let weight = w.pp(leaf).tensor("weight", [hidden])?;
        let weight = if unit_offset {
            weight.add_scalar(1.0)
        } else {
            weight
        };
        Ok(RmsNorm { weight, eps })
    }

    /// `x`: `[tokens, hidden]`. `x * rsqrt(mean(x^2) + eps) * w` ([`LlmBackend::rms_norm`]).
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        B::rms_norm(x, &self.weight, self.eps)
    }

    /// `(x + delta, forward(x + delta))`: a residual add and this norm after it
    /// ([`LlmBackend::add_rms_norm`]).
    pub fn forward_residual(
        &self,
        x: Tensor<B, 2>,
        delta: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        B::add_rms_norm(x, delta, &self.weight, self.eps)
    }

    pub fn num_params(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// RMSNorm as Burn ops: `x * rsqrt(mean(x^2) + eps) * w` in the backend's float type (f32 on
/// the CPU, as HF computes it).
pub fn rms_norm_ops<B: Backend>(x: Tensor<B, 2>, weight: &Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    let var = x.clone().powi_scalar(2).mean_dim(1);
    let x = x * var.add_scalar(eps).sqrt().recip();
    x * weight.clone().unsqueeze_dim(0)
}
