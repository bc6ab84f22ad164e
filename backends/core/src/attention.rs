//! Grouped-query self-attention with a per-sequence KV cache (HF `LlamaAttention` and the
//! variants the other architectures configure: biases, fused qkv, sliding window, softcap).

use crate::backend::LlmBackend;
use burn_tensor::module::attention;
use burn_tensor::ops::AttentionModuleOptions;
use burn_tensor::{Bool, Int, Tensor, TensorData};
use std::sync::{Arc, Mutex};

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
    /// The pool and slot `k`, `v` are views of, when the cache is a [`KvPool`] slot.
    pub pool: Option<(PoolLayer<B>, usize)>,
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
    /// The pool slot the layers live in, if any (given back when the cache is dropped).
    pub slot: Option<SlotLease>,
}

impl<B: LlmBackend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            slot: None,
        }
    }
}

/// One layer's keys and values of every slot of a [`KvPool`]: `[slots, kv_heads, cap, d]`
/// each, slot `s` holding one sequence's positions `0..cap`.
#[derive(Clone)]
pub struct PoolLayer<B: LlmBackend> {
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
}

/// Every sequence's KV cache of a model in one buffer per layer: `slots` sequences (the
/// server's `--max-batch`) of `cap` positions (the model's context), planned at load the way
/// the server plans memory (vLLM and TGI also reserve their KV blocks up front). With all of
/// a step's sequences in slots, one launch per layer appends every row and one attends every
/// decode row ([`LlmBackend::kv_append_rows`], [`LlmBackend::decode_attention_rows`]); with
/// caches of their own, a step of 16 sequences took ~3 launches per sequence and layer.
/// A sequence takes a slot at its first step ([`KvPool::attach`]) and gives it back when its
/// cache is dropped; past `slots` sequences, a cache grows on its own.
pub struct KvPool<B: LlmBackend> {
    layers: Vec<PoolLayer<B>>,
    free: Arc<Mutex<Vec<usize>>>,
}

impl<B: LlmBackend> KvPool<B> {
    /// `layers` layers of `[slots, kv_heads, cap, head_dim]` keys and values.
    pub fn new(
        layers: usize,
        slots: usize,
        kv_heads: usize,
        cap: usize,
        head_dim: usize,
        device: &B::Device,
    ) -> Self {
        let shape = [slots, kv_heads, cap, head_dim];
        KvPool {
            layers: (0..layers)
                .map(|_| PoolLayer {
                    k: B::kv_pool_tensor(shape, device),
                    v: B::kv_pool_tensor(shape, device),
                })
                .collect(),
            // Popped from the end: slot 0 first.
            free: Arc::new(Mutex::new((0..slots).rev().collect())),
        }
    }

    /// Elements held (keys and values of every layer).
    pub fn numel(&self) -> usize {
        self.layers
            .iter()
            .map(|l| 2 * l.k.dims().iter().product::<usize>())
            .sum()
    }

    /// Give a new sequence's `cache` a free slot: each layer's cache becomes a view of it.
    /// Nothing when the cache already holds positions or a slot, or no slot is free.
    pub fn attach(&self, cache: &mut KvCache<B>) {
        if cache.slot.is_some() || cache.len > 0 {
            return;
        }
        let Some(index) = self.free.lock().ok().and_then(|mut f| f.pop()) else {
            return;
        };
        cache.slot = Some(SlotLease {
            index,
            free: self.free.clone(),
        });
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let [_, kv_heads, cap, d] = layer.k.dims();
            let view = |t: &Tensor<B, 4>| t.clone().narrow(0, index, 1).reshape([kv_heads, cap, d]);
            *kv = Some(LayerKv {
                k: view(&layer.k),
                v: view(&layer.v),
                len: 0,
                pool: Some((layer.clone(), index)),
            });
        }
    }
}

/// A [`KvPool`] slot held by one sequence's cache; dropping it frees the slot.
pub struct SlotLease {
    pub index: usize,
    free: Arc<Mutex<Vec<usize>>>,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if let Ok(mut free) = self.free.lock() {
            free.push(self.index);
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
            pool: None,
        },
        None => LayerKv {
            k,
            v,
            len: rows,
            pool: None,
        },
    }
}

/// Longest chunk a pooled step attends row by row ([`LlmBackend::decode_attention_rows`]:
/// a cube per head and row walking the row's positions); longer prompt chunks go per sequence
/// through Burn's attention. 512, the default prefill chunk: on the 8B (H200, run 20) the row
/// kernel took a 512-token prompt's TTFT from 49.2 to 38.5 ms against Burn's attention (its
/// matmuls, mask, softmax and the copies of the repeated keys and values), and a cold load's
/// warm-up from 141 to 58 s (no attention shapes to compile and tune). Not measured: longer
/// chunks, and chunks late in a long prompt, whose rows each walk thousands of positions (the
/// row kernel reads each key and value once per row; Burn's tiles share those reads across
/// rows, so past some rows x positions it may win again).
pub const POOLED_ROWS_MAX_CHUNK: usize = 512;

/// [`POOLED_ROWS_MAX_CHUNK`], or `LLM_POOLED_ROWS_MAX=N` from the environment (read once per
/// process; benchmarks compare the two attention paths on long prompts with it).
pub fn pooled_rows_max_chunk() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| match std::env::var("LLM_POOLED_ROWS_MAX") {
        Ok(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("LLM_POOLED_ROWS_MAX={v} ignored (a row count)");
            POOLED_ROWS_MAX_CHUNK
        }),
        Err(_) => POOLED_ROWS_MAX_CHUNK,
    })
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
    /// `[2 * rows]`: (pool slot, position) of each row, when every sequence's cache is a
    /// [`KvPool`] slot.
    pub kv_rows: Option<Tensor<B, 1, Int>>,
    device: B::Device,
}

impl<B: LlmBackend> ForwardCtx<B> {
    pub fn new(segments: Vec<Segment>, rope: RopeTables<B>, device: &B::Device) -> Self {
        ForwardCtx {
            segments,
            rope,
            kv_rows: None,
            device: device.clone(),
        }
    }

    /// The rows' pool slots: `slots[i]` for segment `i`.
    pub fn with_pool_slots(mut self, slots: &[usize]) -> Self {
        let mut rows = Vec::with_capacity(2 * self.rows());
        for (seg, &slot) in self.segments.iter().zip(slots) {
            for pos in seg.start..seg.start + seg.len {
                rows.extend([slot as i64, pos as i64]);
            }
        }
        let n = rows.len();
        self.kv_rows = Some(Tensor::from_data(TensorData::new(rows, [n]), &self.device));
        self
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
        if let Some(out) = self.forward_pooled(&q, &k, &v, ctx, kv) {
            return self.o_proj.forward(out);
        }
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

    /// Every sequence's cache a slot of one pool (`ctx.kv_rows`): all rows appended in one
    /// launch, and when every chunk is at most [`pooled_rows_max_chunk`] rows, all attended in
    /// one; else attention per sequence over its slot. `None` where the backend does not append
    /// pooled rows.
    fn forward_pooled(
        &self,
        q: &Tensor<B, 3>,
        k: &Tensor<B, 2>,
        v: &Tensor<B, 2>,
        ctx: &ForwardCtx<B>,
        kv: &mut [&mut Option<LayerKv<B>>],
    ) -> Option<Tensor<B, 2>> {
        let c = self.cfg;
        let rows = ctx.kv_rows.as_ref()?;
        let pool = kv.first()?.as_ref()?.pool.as_ref()?.0.clone();
        if !B::kv_append_rows(k, v, c.num_kv_heads, &ctx.rope, &pool, rows) {
            return None;
        }
        for (seg, layer) in ctx.segments.iter().zip(kv.iter_mut()) {
            layer.as_mut().expect("pooled cache").len = seg.start + seg.len;
        }
        // A sequence's chunk by whole-matrix products, where the backend takes it (long
        // chunks: an idle server's prompt is a step of one).
        let chunk = |q: &Tensor<B, 3>, seg: &Segment, layer: &LayerKv<B>| {
            let (pool, slot) = layer.pool.as_ref()?;
            B::chunk_attention(q, pool, *slot, seg.start, &c)
        };
        if let [seg] = ctx.segments[..] {
            if let Some(out) = chunk(q, &seg, kv[0].as_ref().expect("pooled cache")) {
                return Some(out);
            }
        }
        // Every row attends its slot's positions up to its own (this step's rows are already
        // in the pool, so a prompt chunk's rows are causal as they stand): one launch for the
        // whole step when the chunks are short, a step mixing a newcomer's prompt with the
        // others' decode rows included. A long chunk goes per sequence (tiled attention).
        let max = pooled_rows_max_chunk();
        if ctx.segments.iter().all(|s| s.len <= max) {
            if let Some(out) = B::decode_attention_rows(q, &pool, rows, &c) {
                return Some(out);
            }
        }
        let outs: Vec<Tensor<B, 2>> = ctx
            .segments
            .iter()
            .zip(kv.iter())
            .map(|(seg, layer)| {
                let q = q.clone().narrow(1, seg.offset, seg.len);
                let layer = layer.as_ref().expect("pooled cache");
                chunk(&q, seg, layer).unwrap_or_else(|| self.attend(q, layer, seg, &ctx.device))
            })
            .collect();
        Some(Tensor::cat(outs, 0))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    /// Slots go to new sequences in order, none past the pool's size, and come back when a
    /// cache is dropped; a slot's layer caches are views of the pool's shape, empty.
    #[test]
    fn pool_slots_are_leased_and_given_back() {
        let device = Default::default();
        let (layers, slots, kv_heads, cap, d) = (2, 2, 3, 8, 4);
        let pool = KvPool::<Cpu>::new(layers, slots, kv_heads, cap, d, &device);
        assert_eq!(pool.numel(), 2 * layers * slots * kv_heads * cap * d);
        let index = |c: &KvCache<Cpu>| c.slot.as_ref().map(|s| s.index);
        let (mut a, mut b, mut c) = (
            KvCache::new(layers),
            KvCache::new(layers),
            KvCache::new(layers),
        );
        pool.attach(&mut a);
        pool.attach(&mut b);
        pool.attach(&mut c);
        assert_eq!((index(&a), index(&b), index(&c)), (Some(0), Some(1), None));
        for (cache, slot) in [(&a, 0), (&b, 1)] {
            for layer in &cache.layers {
                let layer = layer.as_ref().expect("a slot's layer cache");
                assert_eq!(layer.k.dims(), [kv_heads, cap, d]);
                assert_eq!((layer.len, layer.capacity()), (0, cap));
                assert_eq!(layer.pool.as_ref().map(|p| p.1), Some(slot));
            }
        }
        assert!(
            c.layers.iter().all(Option::is_none),
            "no slot: the cache grows on its own"
        );
        // A second attach keeps the slot; a cache holding positions is left alone.
        pool.attach(&mut a);
        assert_eq!(index(&a), Some(0));
        drop(a);
        c.len = 5;
        pool.attach(&mut c);
        assert_eq!(index(&c), None);
        c.len = 0;
        pool.attach(&mut c);
        assert_eq!(index(&c), Some(0), "the dropped cache's slot");
    }
}
