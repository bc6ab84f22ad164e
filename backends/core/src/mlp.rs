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

    /// The projections with their checkpoint names under `prefix` (e.g. `model.layers.0.mlp`).
    pub fn linears(&self, prefix: &str) -> Vec<(String, &dyn Linear<B>)> {
        let mut v: Vec<(String, &dyn Linear<B>)> = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => vec![
                (format!("{prefix}.gate_proj"), gate_proj.as_ref()),
                (format!("{prefix}.up_proj"), up_proj.as_ref()),
            ],
            GateUp::Fused { gate_up_proj } => {
                vec![(format!("{prefix}.gate_up_proj"), gate_up_proj.as_ref())]
            }
        };
        v.push((format!("{prefix}.down_proj"), self.down_proj.as_ref()));
        v
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
