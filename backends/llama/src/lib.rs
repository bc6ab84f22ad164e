//! Llama (Llama 2/3/3.1, SmolLM2, TinyLlama, and GGUF files of the llama architecture).
//!
//! Ported from HF `transformers/models/llama/modeling_llama.py`: `LlamaDecoderLayer`,
//! `LlamaModel`, `LlamaForCausalLM`. The blocks (RMSNorm, rotary, attention, MLP) come from
//! `llm-core`; this file is the Config, the wiring and the weight names.

use burn_tensor::backend::Backend;
use burn_tensor::{Int, Tensor, TensorData};
use llm_core::{
    parse_config, Activation, Architecture, Attention, AttentionConfig, CausalLm, CoreError,
    ForwardCtx, GateUp, GatedMlp, KvCache, Linear, LoadCtx, LoadOptions, QkvProj, Result, RmsNorm,
    Rope, RopeFields, Weights,
};
use serde::Deserialize;

/// config.json of a Llama checkpoint (HF `LlamaConfig`). Every field is used; any other key is
/// rejected at load (see `llm_core::config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no GQA).
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on gate/up/down.
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_act() -> Activation {
    Activation::Silu
}
fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    fn rope(&self) -> RopeFields {
        RopeFields {
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            rope_parameters: self.rope_parameters.clone(),
        }
    }
    fn check(&self, what: &str) -> Result<()> {
        if self.num_kv_heads() == 0 || !self.num_attention_heads.is_multiple_of(self.num_kv_heads())
        {
            return Err(CoreError::invalid(format!(
                "{what}: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            )));
        }
        if self.hidden_act != Activation::Silu {
            return Err(CoreError::invalid(format!(
                "{what}: hidden_act {:?} is not what llama uses (silu)",
                self.hidden_act
            )));
        }
        Ok(())
    }
}

/// HF `LlamaDecoderLayer`: pre-norm attention and MLP, each with a residual.
pub struct LlamaDecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: GatedMlp<B>,
}

impl<B: Backend> LlamaDecoderLayer<B> {
    fn load(w: &Weights<B>, c: &LlamaConfig) -> Result<Self> {
        let (h, hd, nh, nkv) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.num_kv_heads(),
        );
        let attn = w.pp("self_attn");
        let self_attn = Attention {
            qkv: QkvProj::Separate {
                q_proj: attn.linear("q_proj", h, nh * hd, c.attention_bias)?,
                k_proj: attn.linear("k_proj", h, nkv * hd, c.attention_bias)?,
                v_proj: attn.linear("v_proj", h, nkv * hd, c.attention_bias)?,
            },
            o_proj: attn.linear("o_proj", nh * hd, h, c.attention_bias)?,
            cfg: AttentionConfig {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                scale: (hd as f64).powf(-0.5),
                softcap: None,
                sliding_window: None,
            },
        };
        let mlp = w.pp("mlp");
        let i = c.intermediate_size;
        Ok(LlamaDecoderLayer {
            input_layernorm: RmsNorm::load(w, "input_layernorm", h, c.rms_norm_eps, false)?,
            self_attn,
            post_attention_layernorm: RmsNorm::load(
                w,
                "post_attention_layernorm",
                h,
                c.rms_norm_eps,
                false,
            )?,
            mlp: GatedMlp {
                gate_up: GateUp::Separate {
                    gate_proj: mlp.linear("gate_proj", h, i, c.mlp_bias)?,
                    up_proj: mlp.linear("up_proj", h, i, c.mlp_bias)?,
                },
                down_proj: mlp.linear("down_proj", i, h, c.mlp_bias)?,
                act: c.hidden_act,
            },
        })
    }

    /// `x`: `[tokens, hidden]`.
    fn forward(
        &self,
        x: Tensor<B, 2>,
        ctx: &ForwardCtx<B>,
        kv: &mut Option<llm_core::attention::LayerKv<B>>,
    ) -> Tensor<B, 2> {
        let x = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), ctx, kv);
        x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
    }

    fn num_params(&self) -> usize {
        self.input_layernorm.num_params()
            + self.self_attn.num_params()
            + self.post_attention_layernorm.num_params()
            + self.mlp.num_params()
    }
}

/// HF `LlamaModel`.
pub struct LlamaModel<B: Backend> {
    /// `[vocab, hidden]`.
    pub embed_tokens: Tensor<B, 2>,
    pub layers: Vec<LlamaDecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// HF `LlamaForCausalLM`.
pub struct LlamaForCausalLM<B: Backend> {
    pub model: LlamaModel<B>,
    /// `[vocab, hidden]`; the embedding matrix itself when `tie_word_embeddings`.
    pub lm_head: Box<dyn Linear<B>>,
    pub config: LlamaConfig,
    rope: Rope,
    max_context: usize,
    device: B::Device,
}

impl<B: Backend> LlamaForCausalLM<B> {
    pub fn load(
        config: &serde_json::Value,
        ctx: &LoadCtx<'_, B>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let c: LlamaConfig = parse_config(config, &ctx.source)?;
        c.check(&ctx.source)?;
        let root = Weights::new(ctx);
        let rope_cfg = c.rope().resolve(10_000.0, &ctx.source)?;
        let freq_factors = if root.contains("rope_freqs.weight") {
            Some(ctx.store.f32("rope_freqs.weight")?.data)
        } else {
            None
        };
        let rope = Rope::new(&rope_cfg, c.head_dim(), freq_factors)
            .map_err(|e| CoreError::new(e.code, format!("{}: {}", ctx.source, e.message)))?;
        let w = root.pp("model");
        let embed_tokens = w
            .pp("embed_tokens")
            .tensor("weight", [c.vocab_size, c.hidden_size])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| LlamaDecoderLayer::load(&w.pp("layers").pp(i), &c))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&w, "norm", c.hidden_size, c.rms_norm_eps, false)?;
        let lm_head = if c.tie_word_embeddings {
            ctx.dense_from(embed_tokens.clone(), None)
        } else {
            root.dense("lm_head", c.hidden_size, c.vocab_size)?
        };
        Ok(LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            max_context: opts.context(c.max_position_embeddings),
            config: c,
            rope,
            device: ctx.device.clone(),
        })
    }
}

impl<B: Backend> CausalLm<B> for LlamaForCausalLM<B> {
    fn forward(&self, tokens: &[u32], cache: &mut KvCache<B>, all_logits: bool) -> Tensor<B, 2> {
        let n = tokens.len();
        let start = cache.len;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &self.device);
        let mut h = self.model.embed_tokens.clone().select(0, ids);
        let ctx = ForwardCtx::new(
            start,
            n,
            self.rope.tables(start, n, &self.device),
            &self.device,
        );
        for (layer, kv) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward(h, &ctx, kv);
        }
        cache.len += n;
        let h = if all_logits { h } else { h.narrow(0, n - 1, 1) };
        self.lm_head.forward(self.model.norm.forward(h))
    }

    fn num_layers(&self) -> usize {
        self.config.num_hidden_layers
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn max_context(&self) -> usize {
        self.max_context
    }
    fn num_params(&self) -> usize {
        let [v, h] = self.model.embed_tokens.dims();
        let tied = self.config.tie_word_embeddings;
        v * h
            + self
                .model
                .layers
                .iter()
                .map(|l| l.num_params())
                .sum::<usize>()
            + self.model.norm.num_params()
            + if tied { 0 } else { self.lm_head.num_params() }
    }
    fn device(&self) -> B::Device {
        self.device.clone()
    }
    fn linears(&self) -> Vec<(String, &dyn Linear<B>)> {
        let mut v = Vec::new();
        for (i, l) in self.model.layers.iter().enumerate() {
            v.extend(l.self_attn.linears(&format!("model.layers.{i}.self_attn")));
            v.extend(l.mlp.linears(&format!("model.layers.{i}.mlp")));
        }
        v.push(("lm_head".to_string(), self.lm_head.as_ref()));
        v
    }
}

/// The plugin.
pub struct Llama;

impl Architecture for Llama {
    const NAME: &'static std::ffi::CStr = c"llama";
    const MODEL_TYPES: &'static std::ffi::CStr = c"[\"llama\"]";
    type Model<B: Backend> = LlamaForCausalLM<B>;
    fn load<B: Backend>(
        config: &serde_json::Value,
        ctx: &LoadCtx<'_, B>,
        opts: &LoadOptions,
    ) -> Result<Self::Model<B>> {
        LlamaForCausalLM::load(config, ctx, opts)
    }
}

llm_core::export_backend!(Llama);
