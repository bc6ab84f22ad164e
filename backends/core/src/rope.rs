//! Rotary position embeddings in HF's `rotate_half` layout (HF `LlamaRotaryEmbedding` +
//! `apply_rotary_pos_emb`): the head dim is split in two halves, not interleaved pairs.

use burn_tensor::backend::Backend;
use burn_tensor::{Tensor, TensorData};

use crate::config::{RopeConfig, RopeScaling};
use crate::error::{CoreError, Result};

pub struct Rope {
    /// `[head_dim / 2]`, f32 as HF computes it.
    inv_freq: Vec<f32>,
    /// Positions are multiplied by this before the product with `inv_freq` (linear scaling).
    position_scale: f32,
    head_dim: usize,
}

/// cos/sin tables for the positions of one forward: `[tokens, head_dim]` each.
pub struct RopeTables<B: Backend> {
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
}

impl Rope {
    /// `freq_factors`: `rope_freqs.weight` of a GGUF (`[head_dim/2]`), required for
    /// [`RopeScaling::FreqFactors`] and rejected otherwise.
    pub fn new(cfg: &RopeConfig, head_dim: usize, freq_factors: Option<Vec<f32>>) -> Result<Rope> {
        if !head_dim.is_multiple_of(2) {
            return Err(CoreError::invalid(format!("head_dim {head_dim} is odd")));
        }
        // HF `_compute_default_rope_parameters`: 1 / base^(arange(0, dim, 2) / dim), in f32.
        let base = cfg.theta as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut position_scale = 1.0f32;
        match &cfg.scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => position_scale = 1.0 / *factor as f32,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                // HF `_compute_llama3_parameters`.
                let (factor, low, high, old) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                    *original_max_position_embeddings as f32,
                );
                let low_freq_wavelen = old / low;
                let high_freq_wavelen = old / high;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_freq_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let smooth = (old / wavelen - low) / (high - low);
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    *f = if medium { smoothed } else { scaled };
                }
            }
            RopeScaling::FreqFactors => {
                let factors = freq_factors.as_ref().ok_or_else(|| {
                    CoreError::invalid(
                        "rope scaling by frequency factors needs `rope_freqs.weight`",
                    )
                })?;
                if factors.len() != inv_freq.len() {
                    return Err(CoreError::invalid(format!(
                        "`rope_freqs.weight` has {} entries, expected head_dim/2 = {}",
                        factors.len(),
                        inv_freq.len()
                    )));
                }
                // llama.cpp divides theta by the factor: inv_freq / factor.
                for (f, d) in inv_freq.iter_mut().zip(factors) {
                    *f /= d;
                }
            }
        }
        if freq_factors.is_some() && cfg.scaling != RopeScaling::FreqFactors {
            return Err(CoreError::invalid(
                "`rope_freqs.weight` is present but the rope scaling does not use it",
            ));
        }
        Ok(Rope {
            inv_freq,
            position_scale,
            head_dim,
        })
    }

    /// Tables `[positions.len(), head_dim]`, row `i` at position `positions[i]`.
    pub fn tables_at<B: Backend>(&self, positions: &[usize], device: &B::Device) -> RopeTables<B> {
        let d = self.head_dim;
        let half = d / 2;
        let n = positions.len();
        let mut cos = vec![0f32; n * d];
        let mut sin = vec![0f32; n * d];
        for (i, &p) in positions.iter().enumerate() {
            let pos = p as f32 * self.position_scale;
            for (j, f) in self.inv_freq.iter().enumerate() {
                // f32 product as HF's `inv_freq @ position_ids` in float32, then cos/sin.
                let angle = pos * f;
                let (s, c) = (angle as f64).sin_cos();
                cos[i * d + j] = c as f32;
                cos[i * d + j + half] = c as f32;
                sin[i * d + j] = s as f32;
                sin[i * d + j + half] = s as f32;
            }
        }
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, [n, d]), device),
            sin: Tensor::from_data(TensorData::new(sin, [n, d]), device),
        }
    }
}

impl<B: Backend> RopeTables<B> {
    /// Rows `offset..offset + len` (one sequence's share of a batch).
    pub fn rows(&self, offset: usize, len: usize) -> RopeTables<B> {
        RopeTables {
            cos: self.cos.clone().narrow(0, offset, len),
            sin: self.sin.clone().narrow(0, offset, len),
        }
    }

    /// `x`: `[heads, tokens, head_dim]`. `x * cos + rotate_half(x) * sin`,
    /// `rotate_half(x) = cat(-x2, x1)`.
    pub fn apply(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [_, _, d] = x.dims();
        let x1 = x.clone().narrow(2, 0, d / 2);
        let x2 = x.clone().narrow(2, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
        x * self.cos.clone().unsqueeze_dim(0) + rotated * self.sin.clone().unsqueeze_dim(0)
    }
}
