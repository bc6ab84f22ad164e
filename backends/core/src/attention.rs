//! Grouped-query self-attention with a per-sequence KV cache (HF `LlamaAttention` and the
//! variants the other architectures configure: biases, fused qkv, sliding window, softcap).

use crate::backend::LlmBackend;
use burn_tensor::module::attention;
use burn_tensor::ops::AttentionModuleOptions;
use burn_tensor::{Bool, Tensor, TensorData};

use crate::error::Result;
use crate::linear::Linear;
use crate::rope::RopeTables;
use crate::weights::Weights;

/// Shapes and options of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q k^T`; HF default `head_dim^-0.5`.
    pub scale: f64,
    /// `softcap * tanh(scores / softcap)` before masking (Gemma-2).
    pub softcap: Option<f64>,
    /// Keys more than `window - 1` positions behind the query are masked (HF sliding window).
    pub sliding_window: Option<usize>,
}

/// The q/k/v projections, separate (most checkpoints) or fused into one `qkv_proj` (Phi-3).
pub enum QkvProj<B: LlmBackend> {
    Separate {
        q_proj: Box<dyn Linear<B>>,
        k_proj: Box<dyn Linear<B>>,
        v_proj: Box<dyn Linear<B>>,
    },
    Fused {
        qkv_proj: Box<dyn Linear<B>>,
    },
}

/// One layer's cached keys (rope applied) and values: `[kv_heads, capacity, head_dim]` each,
/// positions `0..len` filled. The capacity is `len` where a backend appends by concatenation
/// (the default); a backend that writes in place keeps room for the next tokens.
pub struct LayerKv<B: LlmBackend> {
    pub k: Tensor<B, 3>,
    pub v: Tensor<B, 3>,
    /// Positions filled.
    pub len: usize,
}

impl<B: LlmBackend> LayerKv<B> {
    /// `[kv_heads, len, head_dim]`.
    pub fn keys(&self) -> Tensor<B, 3> {
        self.filled(&self.k)
    }
    /// `[kv_heads, len, head_dim]`.
    pub fn values(&self) -> Tensor<B, 3> {
        self.filled(&self.v)
    }
    /// Positions with room allocated.
    pub fn capacity(&self) -> usize {
        self.k.dims()[1]
    }
    fn filled(&self, t: &Tensor<B, 3>) -> Tensor<B, 3> {
        if self.capacity() == self.len {
            t.clone()
        } else {
            t.clone().narrow(1, 0, self.len)
        }
    }
}

/// A sequence's KV cache over all layers.
pub struct KvCache<B: LlmBackend> {
    pub layers: Vec<Option<LayerKv<B>>>,
    /// Positions already cached.
    pub len: usize,
}

impl<B: LlmBackend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
        }
    }
}

/// [`LlmBackend::kv_append`] as Burn ops: rope on `k`, then each of `k`, `v` concatenated to
/// the past (a new tensor of exactly `len` positions).
pub fn kv_append_ops<B: LlmBackend>(
    past: Option<LayerKv<B>>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    kv_heads: usize,
    tables: &RopeTables<B>,
) -> LayerKv<B> {
    let [rows, width] = v.dims();
    let k = B::rope(k, kv_heads, tables);
    let v = v
        .reshape([rows, kv_heads, width / kv_heads])
        .swap_dims(0, 1);
    match past {
        Some(p) => LayerKv {
            k: Tensor::cat(vec![p.keys(), k], 1),
            v: Tensor::cat(vec![p.values(), v], 1),
            len: p.len + rows,
        },
        None => LayerKv { k, v, len: rows },
    }
}

/// One sequence's rows in a batched forward.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// First position of this chunk (= tokens already in the sequence's cache).
    pub start: usize,
    /// Tokens in this chunk.
    pub len: usize,
    /// Row of the batch where the chunk begins.
    pub offset: usize,
}

impl Segment {
    /// `[1, 1, len, start + len]`, true = masked: causal, plus the sliding window if any.
    /// None when nothing needs masking (a single decode token with the whole past visible).
    fn mask<B: LlmBackend>(
        &self,
        window: Option<usize>,
        device: &B::Device,
    ) -> Option<Tensor<B, 4, Bool>> {
        let total = self.start + self.len;
        let window_bites = window.is_some_and(|w| total > w);
        if self.len == 1 && !window_bites {
            return None;
        }
        let mut m = vec![false; self.len * total];
        for i in 0..self.len {
            let q = self.start + i;
            for j in 0..total {
                let future = j > q;
                let too_old = window.is_some_and(|w| q - j.min(q) >= w);
                m[i * total + j] = future || too_old;
            }
        }
        Some(Tensor::from_data(
            TensorData::new(m, [1, 1, self.len, total]),
            device,
        ))
    }
}

/// What every layer of one forward shares: the batch's sequences (rows of the hidden state
/// `[rows, hidden]`, one [`Segment`] after another) and the rope tables of every row.
pub struct ForwardCtx<B: LlmBackend> {
    pub segments: Vec<Segment>,
    /// `[rows, head_dim]`: each row at its own sequence's position.
    pub rope: RopeTables<B>,
    device: B::Device,
}

impl<B: LlmBackend> ForwardCtx<B> {
    pub fn new(segments: Vec<Segment>, rope: RopeTables<B>, device: &B::Device) -> Self {
        ForwardCtx {
            segments,
            rope,
            device: device.clone(),
        }
    }

    /// Rows of the batch.
    pub fn rows(&self) -> usize {
        self.segments.last().map_or(0, |s| s.offset + s.len)
    }
}

pub struct Attention<B: LlmBackend> {
    pub qkv: QkvProj<B>,
    pub o_proj: Box<dyn Linear<B>>,
    pub cfg: AttentionConfig,
}

impl<B: LlmBackend> Attention<B> {
    /// `q_proj`, `k_proj`, `v_proj` (with `qkv_bias`) and `o_proj` (with `o_bias`) under `w`.
    pub fn load(
        w: &Weights<B>,
        hidden: usize,
        cfg: AttentionConfig,
        qkv_bias: bool,
        o_bias: bool,
    ) -> Result<Self> {
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        Ok(Attention {
            qkv: QkvProj::Separate {
                q_proj: w.linear("q_proj", hidden, q, qkv_bias)?,
                k_proj: w.linear("k_proj", hidden, kv, qkv_bias)?,
                v_proj: w.linear("v_proj", hidden, kv, qkv_bias)?,
            },
            o_proj: w.linear("o_proj", q, hidden, o_bias)?,
            cfg,
        })
    }

    /// One fused `qkv_proj` (rows: q, then k, then v) and `o_proj`, no biases (Phi-3).
    pub fn load_fused(w: &Weights<B>, hidden: usize, cfg: AttentionConfig) -> Result<Self> {
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        Ok(Attention {
            qkv: QkvProj::Fused {
                qkv_proj: w.linear("qkv_proj", hidden, q + 2 * kv, false)?,
            },
            o_proj: w.linear("o_proj", q, hidden, false)?,
            cfg,
        })
    }

    /// `x`: `[rows, hidden]` -> `[rows, hidden]` for the batch `ctx` describes; appends each
    /// sequence's k/v to its cache in `kv` (one per segment). The projections and q's rope
    /// run on all rows at once; the cache append (k's rope included) and attention run per
    /// sequence, over its own cache.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        ctx: &ForwardCtx<B>,
        kv: &mut [&mut Option<LayerKv<B>>],
    ) -> Tensor<B, 2> {
        let c = self.cfg;
        let (q, k, v) = match &self.qkv {
            QkvProj::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => match B::linears_stacked(&x, &[q_proj.as_ref(), k_proj.as_ref(), v_proj.as_ref()])
            {
                Some(mut qkv) => {
                    let v = qkv.pop().expect("v");
                    let k = qkv.pop().expect("k");
                    (qkv.pop().expect("q"), k, v)
                }
                None => (
                    q_proj.forward(x.clone()),
                    k_proj.forward(x.clone()),
                    v_proj.forward(x),
                ),
            },
            QkvProj::Fused { qkv_proj } => {
                let qkv = qkv_proj.forward(x);
                let (qd, kd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
                (
                    qkv.clone().narrow(1, 0, qd),
                    qkv.clone().narrow(1, qd, kd),
                    qkv.narrow(1, qd + kd, kd),
                )
            }
        };
        // [rows, heads * d] -> [heads, rows, d], rope applied.
        let q = B::rope(q, c.num_heads, &ctx.rope);
        let single = ctx.segments.len() == 1;
        let mut outs: Vec<Tensor<B, 2>> = ctx
            .segments
            .iter()
            .zip(kv.iter_mut())
            .map(|(seg, kv)| {
                let part = |t: &Tensor<B, 2>| {
                    if single {
                        t.clone()
                    } else {
                        t.clone().narrow(0, seg.offset, seg.len)
                    }
                };
                let narrowed;
                let tables = if single {
                    &ctx.rope
                } else {
                    narrowed = ctx.rope.rows(seg.offset, seg.len);
                    &narrowed
                };
                let layer = B::kv_append(kv.take(), part(&k), part(&v), c.num_kv_heads, tables);
                let q = if single {
                    q.clone()
                } else {
                    q.clone().narrow(1, seg.offset, seg.len)
                };
                let out = self.attend(q, &layer, seg, &ctx.device);
                **kv = Some(layer);
                out
            })
            .collect();
        let out = if outs.len() == 1 {
            outs.pop().expect("one segment")
        } else {
            Tensor::cat(outs, 0)
        };
        self.o_proj.forward(out)
    }

    /// One sequence: `q` `[heads, len, d]` (rope applied) over its cache `kv`, this chunk's
    /// entries already appended -> `[len, heads * d]`.
    fn attend(
        &self,
        q: Tensor<B, 3>,
        kv: &LayerKv<B>,
        seg: &Segment,
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let c = self.cfg;
        let s = seg.len;
        if s == 1 {
            if let Some(out) = B::decode_attention(&q, kv, &c) {
                return out;
            }
        }
        let (k, v) = (kv.keys(), kv.values());
        // GQA: each kv head serves `groups` query heads (HF `repeat_kv`).
        let total = kv.len;
        let groups = c.num_heads / c.num_kv_heads;
        let repeat = |t: Tensor<B, 3>| -> Tensor<B, 4> {
            if groups == 1 {
                return t.unsqueeze_dim(0);
            }
            t.unsqueeze_dim::<4>(1)
                .expand([c.num_kv_heads, groups, total, c.head_dim])
                .reshape([1, c.num_heads, total, c.head_dim])
        };
        let mask = seg
            .mask::<B>(c.sliding_window, device)
            .map(|m| m.expand([1, c.num_heads, s, total]));
        let out = attention(
            q.unsqueeze_dim(0),
            repeat(k),
            repeat(v),
            mask,
            None,
            AttentionModuleOptions {
                scale: Some(c.scale),
                softcap: c.softcap,
                is_causal: false,
            },
        );
        // [1, heads, tokens, d] -> [tokens, heads * d]
        out.reshape([c.num_heads, s, c.head_dim])
            .swap_dims(0, 1)
            .reshape([s, c.num_heads * c.head_dim])
    }

    /// The projections with their checkpoint names under `prefix` (e.g. `model.layers.0.self_attn`).
    pub fn linears(&self, prefix: &str) -> Vec<(String, &dyn Linear<B>)> {
        let mut v: Vec<(String, &dyn Linear<B>)> = match &self.qkv {
            QkvProj::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => vec![
                (format!("{prefix}.q_proj"), q_proj.as_ref()),
                (format!("{prefix}.k_proj"), k_proj.as_ref()),
                (format!("{prefix}.v_proj"), v_proj.as_ref()),
            ],
            QkvProj::Fused { qkv_proj } => vec![(format!("{prefix}.qkv_proj"), qkv_proj.as_ref())],
        };
        v.push((format!("{prefix}.o_proj"), self.o_proj.as_ref()));
        v
    }

    pub fn num_params(&self) -> usize {
        let qkv = match &self.qkv {
            QkvProj::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => q_proj.num_params() + k_proj.num_params() + v_proj.num_params(),
            QkvProj::Fused { qkv_proj } => qkv_proj.num_params(),
        };
        qkv + self.o_proj.num_params()
    }
}
