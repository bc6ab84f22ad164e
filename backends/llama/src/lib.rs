//! Llama (Llama 2/3/3.1, SmolLM2, TinyLlama, and GGUF files of the llama architecture).
//!
//! Port of HF `transformers/models/llama/modeling_llama.py`. The blocks and the decoder loop come
//! from `llm-core` (`PreNormLayer` is `LlamaDecoderLayer`); this file is the Config and the wiring.

use llm_core::LlmBackend;
use llm_core::{
    parse_config, Activation, Architecture, Attention, AttentionConfig, CausalDecoder, CoreError,
    DecoderSpec, Describer, Description, GatedMlp, LoadCtx, LoadOptions, PreNormLayer, Result,
    RopeFields, GATE_UP_DOWN,
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

/// HF `LlamaForCausalLM`.
pub type LlamaForCausalLM<B> = CausalDecoder<B, PreNormLayer<B>>;

/// The derived shapes `load` and `describe` share.
struct Plan {
    c: LlamaConfig,
    spec: DecoderSpec,
    attn: AttentionConfig,
}

fn plan(config: &serde_json::Value, what: &str) -> Result<Plan> {
    let c: LlamaConfig = parse_config(config, what)?;
    c.check(what)?;
    let rope = RopeFields {
        rope_theta: c.rope_theta,
        rope_scaling: c.rope_scaling.clone(),
        rope_parameters: c.rope_parameters.clone(),
    }
    .resolve(10_000.0, what)?;
    let head_dim = c.head_dim();
    let attn = AttentionConfig {
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_kv_heads(),
        head_dim,
        scale: (head_dim as f64).powf(-0.5),
        softcap: None,
        sliding_window: None,
    };
    let spec = DecoderSpec {
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        num_hidden_layers: c.num_hidden_layers,
        rms_norm_eps: c.rms_norm_eps,
        norm_unit_offset: false,
        tie_word_embeddings: c.tie_word_embeddings,
        max_position_embeddings: c.max_position_embeddings,
        rope,
        head_dim,
        num_key_value_heads: attn.num_kv_heads,
        embed_scale: None,
        final_logit_softcap: None,
    };
    Ok(Plan { c, spec, attn })
}

/// Build the model from config.json and the weights.
pub fn load<B: LlmBackend>(
    config: &serde_json::Value,
    ctx: &LoadCtx<'_, B>,
    opts: &LoadOptions,
) -> Result<LlamaForCausalLM<B>> {
    let Plan { c, spec, attn } = plan(config, &ctx.source)?;
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    CausalDecoder::load(ctx, opts, spec, |w, _| {
        Ok(PreNormLayer {
            input_layernorm: llm_core::RmsNorm::load(w, "input_layernorm", h, eps, false)?,
            self_attn: Attention::load(
                &w.pp("self_attn"),
                h,
                attn,
                c.attention_bias,
                c.attention_bias,
            )?,
            post_attention_layernorm: llm_core::RmsNorm::load(
                w,
                "post_attention_layernorm",
                h,
                eps,
                false,
            )?,
            mlp: GatedMlp::load(
                &w.pp("mlp"),
                ["gate_proj", "up_proj", "down_proj"],
                h,
                c.intermediate_size,
                c.hidden_act,
                c.mlp_bias,
            )?,
        })
    })
}

/// `print(model)` of HF `LlamaForCausalLM`, from config.json alone.
pub fn describe(config: &serde_json::Value, d: &Describer, what: &str) -> Result<Description> {
    let Plan { c, spec, attn } = plan(config, what)?;
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    let (ab, mb) = (c.attention_bias, c.mlp_bias);
    let mlp = d.gated_mlp(
        "LlamaMLP",
        GATE_UP_DOWN,
        h,
        c.intermediate_size,
        c.hidden_act,
        mb,
    );
    let self_attn = d.attention("Llama", h, &attn, ab, ab);
    let layer = d.pre_norm_layer("Llama", h, eps, self_attn, ("mlp", mlp));
    Ok(Description::new(
        d.causal_lm("Llama", config, &spec, layer),
        &spec,
        &attn,
    ))
}

/// The plugin.
pub struct Llama;

impl Architecture for Llama {
    const NAME: &'static std::ffi::CStr = c"llama";
    const MODEL_TYPES: &'static std::ffi::CStr = c"[\"llama\"]";
    type Model<B: LlmBackend> = LlamaForCausalLM<B>;
    fn load<B: LlmBackend>(
        config: &serde_json::Value,
        ctx: &LoadCtx<'_, B>,
        opts: &LoadOptions,
    ) -> Result<Self::Model<B>> {
        load(config, ctx, opts)
    }
    fn describe(config: &serde_json::Value, d: &Describer, what: &str) -> Result<Description> {
        describe(config, d, what)
    }
}

llm_core::export_backend!(Llama);
