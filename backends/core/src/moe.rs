//! Sparse mixture of experts with top-k softmax routing (HF `MixtralSparseMoeBlock`): the
//! router picks `top_k` experts per token from `softmax(gate(x))`, their weights are renormalized
//! to sum to one, and the token's output is the weighted sum of those experts' MLPs.

use crate::backend::LlmBackend;
use burn_tensor::IndexingUpdateOp;
use burn_tensor::{Int, Tensor, TensorData};

use crate::linear::Linear;
use crate::mlp::GatedMlp;

pub struct SparseMoe<B: LlmBackend> {
    /// Router: `[num_experts, hidden]`.
    pub gate: Box<dyn Linear<B>>,
    pub experts: Vec<GatedMlp<B>>,
    pub top_k: usize,
}

/// Per token: the chosen experts and their renormalized weights, in HF's order (topk sorted,
/// highest first; ties to the lower expert index).
pub fn route(router_logits: &[f32], num_experts: usize, top_k: usize) -> Vec<Vec<(usize, f32)>> {
    router_logits
        .chunks(num_experts)
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = row.iter().map(|&l| (l - max).exp()).collect();
            let z: f32 = exps.iter().sum();
            let probs: Vec<f32> = exps.iter().map(|e| e / z).collect();
            let mut idx: Vec<usize> = (0..num_experts).collect();
            idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            idx.truncate(top_k);
            let sum: f32 = idx.iter().map(|&e| probs[e]).sum();
            idx.into_iter().map(|e| (e, probs[e] / sum)).collect()
        })
        .collect()
}

impl<B: LlmBackend> SparseMoe<B> {
    /// `x`: `[tokens, hidden]` -> `[tokens, hidden]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [tokens, hidden] = x.dims();
        let device = x.device();
        let logits: Vec<f32> = self
            .gate
            .forward(x.clone())
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("router logits");
        let routes = route(&logits, self.experts.len(), self.top_k);
        let mut out = Tensor::<B, 2>::zeros([tokens, hidden], &device);
        // Expert by expert, as HF loops: gather its tokens, run the MLP, scale, scatter-add.
        for (e, expert) in self.experts.iter().enumerate() {
            let (rows, weights): (Vec<i64>, Vec<f32>) = routes
                .iter()
                .enumerate()
                .filter_map(|(t, r)| r.iter().find(|(x, _)| *x == e).map(|&(_, w)| (t as i64, w)))
                .unzip();
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &device);
            let w = Tensor::<B, 2>::from_data(TensorData::new(weights, [n, 1]), &device);
            let y = expert.forward(x.clone().select(0, idx.clone())) * w;
            out = out.select_assign(0, idx, y, IndexingUpdateOp::Add);
        }
        out
    }

    pub fn num_params(&self) -> usize {
        self.gate.num_params() + self.experts.iter().map(|e| e.num_params()).sum::<usize>()
    }

    /// `{prefix}.gate` and `{prefix}.experts.{e}.{w1,w3,w2}`.
    pub fn linears(&self, prefix: &str) -> Vec<(String, &dyn Linear<B>)> {
        let mut v: Vec<(String, &dyn Linear<B>)> =
            vec![(format!("{prefix}.gate"), self.gate.as_ref())];
        for (e, expert) in self.experts.iter().enumerate() {
            v.extend(expert.linears(&format!("{prefix}.experts.{e}")));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top2_weights_renormalize() {
        // softmax([0, ln 2, ln 3, -inf-ish]) = [1/6, 2/6, 3/6, ~0]: top-2 = experts 2, 1.
        let r = route(&[0.0, 2f32.ln(), 3f32.ln(), -30.0], 4, 2);
        assert_eq!(r[0][0].0, 2);
        assert_eq!(r[0][1].0, 1);
        assert!((r[0][0].1 - 0.6).abs() < 1e-6 && (r[0][1].1 - 0.4).abs() < 1e-6);
    }
}
