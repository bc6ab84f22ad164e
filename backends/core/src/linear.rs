//! The linear layer abstraction every projection goes through. Dense (float) weights today; the
//! NF4 module implements the same trait.

use burn_tensor::backend::Backend;
use burn_tensor::Tensor;

/// `y = x W^T + b` over a batch of token rows.
pub trait Linear<B: Backend>: Send + Sync {
    /// `x`: `[tokens, in_features]` -> `[tokens, out_features]`.
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2>;
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// Parameter count (weights + bias), as PyTorch's `numel` counts them.
    fn num_params(&self) -> usize;
    /// Bytes of the NF4 weight as the checkpoint stores it, when this layer is NF4.
    fn nf4_bytes(&self) -> Option<usize> {
        None
    }
    /// The concrete layer, for a backend that launches several of its own layers together
    /// ([`crate::backend::LlmBackend::linears_stacked`]).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A float linear layer. The weight stays `[out, in]` as the checkpoint stores it and is used
/// transposed: on CUDA `[b,K] x [K,N]` with a row-major `[K,N]` weight was measured 3-9x slower
/// at batch 1 than multiplying by the transpose of `[N,K]` (DESIGN.md, measured facts).
pub struct DenseLinear<B: Backend> {
    /// `[out, in]`.
    pub weight: Tensor<B, 2>,
    /// `[out]`.
    pub bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> DenseLinear<B> {
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        DenseLinear { weight, bias }
    }
}

impl<B: Backend> Linear<B> for DenseLinear<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = x.matmul(self.weight.clone().transpose());
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze_dim(0),
            None => y,
        }
    }
    fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    fn num_params(&self) -> usize {
        let [o, i] = self.weight.dims();
        o * i + self.bias.as_ref().map_or(0, |b| b.dims()[0])
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
