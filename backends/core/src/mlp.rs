//! Gated MLP: `down(act(gate(x)) * up(x))` (HF `LlamaMLP`; Phi-3 fuses gate and up into
//! `gate_up_proj`; Gemma uses GELU-tanh).

use crate::backend::LlmBackend;
use burn_tensor::activation::{gelu_approximate, silu};
use burn_tensor::backend::Backend;
use burn_tensor::Tensor;

use crate::config::Activation;
use crate::error::Result;
use crate::linear::Linear;
use crate::weights::Weights;

/// The checkpoint names of most gated MLPs (HF `LlamaMLP`).
pub const GATE_UP_DOWN: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

pub enum GateUp<B: LlmBackend> {
    Separate {
        gate_proj: Box<dyn Linear<B>>,
        up_proj: Box<dyn Linear<B>>,
    },
    /// `[gate; up]` stacked on the output dim (Phi-3 `gate_up_proj`).
    Fused { gate_up_proj: Box<dyn Linear<B>> },
}

pub struct GatedMlp<B: LlmBackend> {
    pub gate_up: GateUp<B>,
    pub down_proj: Box<dyn Linear<B>>,
    pub act: Activation,
    /// Checkpoint names of the gate, up and down projections.
    names: [String; 3],
}

impl<B: LlmBackend> GatedMlp<B> {
    /// Separate projections named `[gate, up, down]` under `w` (`gate_proj`/`up_proj`/`down_proj`,
    /// or Mixtral's `w1`/`w3`/`w2`).
    pub fn load(
        w: &Weights<B>,
        names: [&str; 3],
        hidden: usize,
        intermediate: usize,
        act: Activation,
        bias: bool,
    ) -> Result<Self> {
        Ok(GatedMlp {
            gate_up: GateUp::Separate {
                gate_proj: w.linear(names[0], hidden, intermediate, bias)?,
                up_proj: w.linear(names[1], hidden, intermediate, bias)?,
            },
            down_proj: w.linear(names[2], intermediate, hidden, bias)?,
            act,
            names: [
                names[0].to_string(),
                names[1].to_string(),
                names[2].to_string(),
            ],
        })
    }

    /// One fused `gate_up_proj` (rows: gate, then up) and `down_proj` (Phi-3).
    pub fn load_fused(
        w: &Weights<B>,
        hidden: usize,
        intermediate: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(GatedMlp {
            gate_up: GateUp::Fused {
                gate_up_proj: w.linear("gate_up_proj", hidden, 2 * intermediate, false)?,
            },
            down_proj: w.linear("down_proj", intermediate, hidden, false)?,
            act,
            names: ["gate_up_proj".into(), String::new(), "down_proj".into()],
        })
    }

    /// `x`: `[tokens, hidden]` -> `[tokens, hidden]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                let (g, u) = (gate_proj.as_ref(), up_proj.as_ref());
                if let Some(h) = B::gated_linears(&x, g, u, self.act) {
                    return self.down_proj.forward(h);
                }
                (gate_proj.forward(x.clone()), up_proj.forward(x))
            }
            GateUp::Fused { gate_up_proj } => {
                let gu = gate_up_proj.forward(x);
                let i = gu.dims()[1] / 2;
                (gu.clone().narrow(1, 0, i), gu.narrow(1, i, i))
            }
        };
        self.down_proj.forward(B::gated_act(gate, up, self.act))
    }

    /// The projections with their checkpoint names under `prefix` (e.g. `model.layers.0.mlp`).
    pub fn linears(&self, prefix: &str) -> Vec<(String, &dyn Linear<B>)> {
        let n = &self.names;
        let mut v: Vec<(String, &dyn Linear<B>)> = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => vec![
                (format!("{prefix}.{}", n[0]), gate_proj.as_ref()),
                (format!("{prefix}.{}", n[1]), up_proj.as_ref()),
            ],
            GateUp::Fused { gate_up_proj } => {
                vec![(format!("{prefix}.{}", n[0]), gate_up_proj.as_ref())]
            }
        };
        v.push((format!("{prefix}.{}", n[2]), self.down_proj.as_ref()));
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

/// `act(gate) * up` as Burn ops.
pub fn gated_act_ops<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    act: Activation,
) -> Tensor<B, 2> {
    let gate = match act {
        Activation::Silu => silu(gate),
        Activation::GeluTanh => gelu_approximate(gate),
    };
    gate * up
}
