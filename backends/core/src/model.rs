//! The decoder-only causal LM every architecture here is (HF `*ForCausalLM`): token embedding,
//! a stack of decoder layers, a final norm and the LM head. Architectures provide the layer
//! type and their config; the loop, the cache bookkeeping and the head live here once.

use crate::backend::LlmBackend;
use burn_tensor::{Int, Tensor, TensorData};

use crate::attention::{Attention, ForwardCtx, KvPool, LayerKv, Segment};
use crate::engine::{CausalLm, SeqChunk};
use crate::linear::Linear;
use crate::mlp::GatedMlp;
use crate::norm::RmsNorm;
use crate::rope::Rope;

/// One decoder layer.
pub trait DecoderLayer<B: LlmBackend>: Send + Sync + 'static {
    /// `x`: `[rows, hidden]`, the batch `ctx` describes; appends each sequence's keys/values
    /// to its layer cache in `kv` (one per segment).
    fn forward(
        &self,
        x: Tensor<B, 2>,
        ctx: &ForwardCtx<B>,
        kv: &mut [&mut Option<LayerKv<B>>],
    ) -> Tensor<B, 2>;
    fn num_params(&self) -> usize;
    /// Linear layers with their module names under `prefix` (`model.layers.3`).
    fn linears(&self, prefix: &str) -> Vec<(String, &dyn Linear<B>)>;
}

/// The pre-norm layer of Llama, Mistral, Qwen2 and Phi-3 (HF `LlamaDecoderLayer`):
/// `x + self_attn(input_layernorm(x))`, then `x + mlp(post_attention_layernorm(x))`.
pub struct PreNormLayer<B: LlmBackend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: GatedMlp<B>,
}

impl<B: LlmBackend> DecoderLayer<B> for PreNormLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 2>,
        ctx: &ForwardCtx<B>,
        kv: &mut [&mut Option<LayerKv<B>>],
    ) -> Tensor<B, 2> {
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), ctx, kv);
        let (x, normed) = self.post_attention_layernorm.forward_residual(x, attn);
        x + self.mlp.forward(normed)
    }
    fn num_params(&self) -> usize {
        self.input_layernorm.num_params()
            + self.self_attn.num_params()
            + self.post_attention_layernorm.num_params()
            + self.mlp.num_params()
    }
    fn linears(&self, prefix: &str) -> Vec<(String, &dyn Linear<B>)> {
        let mut v = self.self_attn.linears(&format!("{prefix}.self_attn"));
        v.extend(self.mlp.linears(&format!("{prefix}.mlp")));
        v
    }
}

/// HF `*ForCausalLM` of a decoder-only transformer.
pub struct CausalDecoder<B: LlmBackend, L: DecoderLayer<B>> {
    /// `model.embed_tokens`: `[vocab, hidden]`.
    pub embed_tokens: Tensor<B, 2>,
    /// `model.layers`.
    pub layers: Vec<L>,
    /// `model.norm`.
    pub norm: RmsNorm<B>,
    /// `lm_head` (`[vocab, hidden]`; the embedding matrix when tied).
    pub lm_head: Box<dyn Linear<B>>,
    pub tie_word_embeddings: bool,
    pub rope: Rope,
    /// Multiplies the embeddings (Gemma: `sqrt(hidden_size)`).
    pub embed_scale: Option<f32>,
    /// `cap * tanh(logits / cap)` on the output (Gemma-2 `final_logit_softcapping`).
    pub final_logit_softcap: Option<f64>,
    pub vocab_size: usize,
    pub max_context: usize,
    /// Every sequence's KV cache, on backends that pool them ([`LlmBackend::KV_POOL`]) when
    /// the load asks for a batch size.
    pub kv_pool: Option<KvPool<B>>,
    pub device: B::Device,
}

impl<B: LlmBackend, L: DecoderLayer<B>> CausalLm<B> for CausalDecoder<B, L> {
    fn forward_batch(&self, batch: &mut [SeqChunk<'_, B>], all_logits: bool) -> Tensor<B, 2> {
        let mut segments = Vec::with_capacity(batch.len());
        let mut positions = Vec::new();
        let mut ids = Vec::new();
        for chunk in batch.iter() {
            let start = chunk.cache.len;
            segments.push(Segment {
                start,
                len: chunk.tokens.len(),
                offset: ids.len(),
            });
            positions.extend(start..start + chunk.tokens.len());
            ids.extend(chunk.tokens.iter().map(|&t| t as i64));
        }
        let rows = ids.len();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [rows]), &self.device);
        let mut h = self.embed_tokens.clone().select(0, ids);
        if let Some(s) = self.embed_scale {
            h = h.mul_scalar(s);
        }
        let mut ctx = ForwardCtx::new(
            segments,
            self.rope.tables_at(&positions, &self.device),
            &self.device,
        );
        if let Some(pool) = &self.kv_pool {
            for chunk in batch.iter_mut() {
                pool.attach(chunk.cache);
            }
            let slots: Option<Vec<usize>> = batch
                .iter()
                .map(|c| c.cache.slot.as_ref().map(|s| s.index))
                .collect();
            if let Some(slots) = slots {
                ctx = ctx.with_pool_slots(&slots);
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let mut kv: Vec<&mut Option<LayerKv<B>>> =
                batch.iter_mut().map(|c| &mut c.cache.layers[i]).collect();
            h = layer.forward(h, &ctx, &mut kv);
        }
        for chunk in batch.iter_mut() {
            chunk.cache.len += chunk.tokens.len();
        }
        let h = if all_logits || ctx.segments.iter().all(|s| s.len == 1) {
            h
        } else {
            let last: Vec<i64> = ctx
                .segments
                .iter()
                .map(|s| (s.offset + s.len - 1) as i64)
                .collect();
            let n = last.len();
            h.select(
                0,
                Tensor::<B, 1, Int>::from_data(TensorData::new(last, [n]), &self.device),
            )
        };
        let logits = self.lm_head.forward(self.norm.forward(h));
        match self.final_logit_softcap {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }
    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_context(&self) -> usize {
        self.max_context
    }
    fn num_params(&self) -> usize {
        let [v, h] = self.embed_tokens.dims();
        v * h
            + self.layers.iter().map(|l| l.num_params()).sum::<usize>()
            + self.norm.num_params()
            + if self.tie_word_embeddings {
                0
            } else {
                self.lm_head.num_params()
            }
    }
    fn device(&self) -> B::Device {
        self.device.clone()
    }
    fn kv_pool_numel(&self) -> Option<usize> {
        self.kv_pool.as_ref().map(|p| p.numel())
    }
    fn linears(&self) -> Vec<(String, &dyn Linear<B>)> {
        let mut v: Vec<(String, &dyn Linear<B>)> = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| l.linears(&format!("model.layers.{i}")))
            .collect();
        v.push(("lm_head".to_string(), self.lm_head.as_ref()));
        v
    }
}

/// What [`CausalDecoder::load`] needs besides the layers.
pub struct DecoderSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub rms_norm_eps: f64,
    /// Gemma's `(1 + w)` RMSNorm for `model.norm`.
    pub norm_unit_offset: bool,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub rope: crate::config::RopeConfig,
    pub head_dim: usize,
    /// Key/value heads of every layer's attention (the KV-cache pool's shape).
    pub num_key_value_heads: usize,
    pub embed_scale: Option<f32>,
    pub final_logit_softcap: Option<f64>,
}

impl<B: LlmBackend, L: DecoderLayer<B>> CausalDecoder<B, L> {
    /// Load `model.embed_tokens`, `model.layers.{i}` (through `layer`), `model.norm`, `lm_head`
    /// (or tie it to the embeddings) and the rotary tables (`rope_freqs.weight` of a GGUF).
    pub fn load(
        ctx: &crate::weights::LoadCtx<'_, B>,
        opts: &crate::export::LoadOptions,
        spec: DecoderSpec,
        layer: impl Fn(&crate::weights::Weights<B>, usize) -> crate::error::Result<L>,
    ) -> crate::error::Result<Self> {
        let root = crate::weights::Weights::new(ctx);
        let freq_factors = if root.contains("rope_freqs.weight") {
            Some(ctx.store.f32("rope_freqs.weight")?.data)
        } else {
            None
        };
        let rope = Rope::new(&spec.rope, spec.head_dim, freq_factors).map_err(|e| {
            crate::error::CoreError::new(e.code, format!("{}: {}", ctx.source, e.message))
        })?;
        let w = root.pp("model");
        let embed_tokens = w
            .pp("embed_tokens")
            .tensor("weight", [spec.vocab_size, spec.hidden_size])?;
        let layers = (0..spec.num_hidden_layers)
            .map(|i| layer(&w.pp("layers").pp(i), i))
            .collect::<crate::error::Result<Vec<_>>>()?;
        let norm = RmsNorm::load(
            &w,
            "norm",
            spec.hidden_size,
            spec.rms_norm_eps,
            spec.norm_unit_offset,
        )?;
        let lm_head = if spec.tie_word_embeddings {
            ctx.dense_from(embed_tokens.clone(), None)
        } else {
            root.dense("lm_head", spec.hidden_size, spec.vocab_size)?
        };
        let max_context = opts.context(spec.max_position_embeddings);
        let kv_pool = (B::KV_POOL && opts.max_batch > 0).then(|| {
            KvPool::new(
                spec.num_hidden_layers,
                opts.max_batch,
                spec.num_key_value_heads,
                max_context,
                spec.head_dim,
                &ctx.device,
            )
        });
        Ok(CausalDecoder {
            embed_tokens,
            layers,
            norm,
            lm_head,
            tie_word_embeddings: spec.tie_word_embeddings,
            rope,
            embed_scale: spec.embed_scale,
            final_logit_softcap: spec.final_logit_softcap,
            vocab_size: spec.vocab_size,
            max_context,
            kv_pool,
            device: ctx.device.clone(),
        })
    }
}
