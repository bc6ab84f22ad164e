//! Gated MLP: `down(act(gate(x)) * up(x))` (HF `LlamaMLP`; Phi-3 fuses gate and up into
//! `gate_up_proj`; Gemma uses GELU-tanh).

use burn_tensor::activation::{gelu_approximate, silu};
use burn_tensor::backend::Backend;
use burn_tensor::Tensor;

use crate::config::Activation;
use crate::linear::Linear;

pub enum GateUp<B: Backend> {
    Separate {
        gate_proj: Box<dyn Linear<B>>,
        up_proj: Box<dyn Linear<B>>,
    },
    /// `[gate; up]` stacked on the output dim (Phi-3 `gate_up_proj`).
    Fused { gate_up_proj: Box<dyn Linear<B>> },
}

pub struct GatedMlp<B: Backend> {
    pub gate_up: GateUp<B>,
    pub down_proj: Box<dyn Linear<B>>,
    pub act: Activation,
}

impl<B: Backend> GatedMlp<B> {
    /// `x`: `[tokens, hidden]` -> `[tokens, hidden]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                (gate_proj.forward(x.clone()), up_proj.forward(x))
            }
            GateUp::Fused { gate_up_proj } => {
                let gu = gate_up_proj.forward(x);
                let i = gu.dims()[1] / 2;
                (gu.clone().narrow(1, 0, i), gu.narrow(1, i, i))
            }
        };
        let gate = match self.act {
            Activation::Silu => silu(gate),
            Activation::GeluTanh => gelu_approximate(gate),
        };
        self.down_proj.forward(gate * up)
    }

    pub fn num_params(&self) -> usize {
        let gu = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                gate_proj.num_params() + up_proj.num_params()
            }
            GateUp::Fused { gate_up_proj } => gate_up_proj.num_params(),
        };
        gu + self.down_proj.num_params()
    }
}
