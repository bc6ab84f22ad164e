//! Phi-3 (mini 4k). Port of HF `transformers/models/phi3/modeling_phi3.py`: the Llama layer with
//! fused `qkv_proj` and `gate_up_proj`, and sliding-window attention. Long-context rope scalings
//! (`longrope`/`su`, the 128k variants) are rejected with a clear error rather than run wrong.

use llm_core::LlmBackend;
use llm_core::{
    parse_config, Activation, Architecture, Attention, AttentionConfig, CausalDecoder, CoreError,
    DecoderSpec, Describer, Description, GatedMlp, LoadCtx, LoadOptions, PreNormLayer, Result,
    RmsNorm, RopeFields,
};
use serde::Deserialize;

/// config.json of a Phi-3 checkpoint (HF `Phi3Config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phi3Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    /// Only read by the long-context rope scalings, which are rejected: with `rope_scaling` null
    /// it has no effect.
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    /// Fraction of the head dim that is rotated; only 1.0 is implemented.
    #[serde(default = "one")]
    pub partial_rotary_factor: f64,
    /// Keys more than `sliding_window - 1` positions back are masked (every layer).
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Phi-3's projections have no biases; only `false` is accepted.
    #[serde(default)]
    pub attention_bias: bool,
}

fn default_act() -> Activation {
    Activation::Silu
}
fn default_eps() -> f64 {
    1e-5
}
fn one() -> f64 {
    1.0
}

/// HF `Phi3ForCausalLM`.
pub type Phi3ForCausalLM<B> = CausalDecoder<B, PreNormLayer<B>>;

/// The derived shapes `load` and `describe` share.
struct Plan {
    c: Phi3Config,
    spec: DecoderSpec,
    attn: AttentionConfig,
}

fn plan(config: &serde_json::Value, what: &str) -> Result<Plan> {
    let c: Phi3Config = parse_config(config, what)?;
    if c.partial_rotary_factor != 1.0 {
        return Err(CoreError::unimplemented(format!(
            "{what}: partial_rotary_factor {} is not implemented (1.0 is)",
            c.partial_rotary_factor
        )));
    }
    if c.attention_bias {
        return Err(CoreError::invalid(format!(
            "{what}: attention_bias must be false for phi3"
        )));
    }
    if c.hidden_act != Activation::Silu {
        return Err(CoreError::invalid(format!(
            "{what}: hidden_act must be silu for phi3"
        )));
    }
    let rope = RopeFields {
        rope_theta: c.rope_theta,
        rope_scaling: c.rope_scaling.clone(),
        rope_parameters: c.rope_parameters.clone(),
    }
    .resolve(10_000.0, what)?;
    let head_dim = c.hidden_size / c.num_attention_heads;
    let attn = AttentionConfig {
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
        head_dim,
        scale: (head_dim as f64).powf(-0.5),
        softcap: None,
        sliding_window: c.sliding_window,
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

pub fn load<B: LlmBackend>(
    config: &serde_json::Value,
    ctx: &LoadCtx<'_, B>,
    opts: &LoadOptions,
) -> Result<Phi3ForCausalLM<B>> {
    let Plan { c, spec, attn } = plan(config, &ctx.source)?;
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    CausalDecoder::load(ctx, opts, spec, |w, _| {
        Ok(PreNormLayer {
            input_layernorm: RmsNorm::load(w, "input_layernorm", h, eps, false)?,
            self_attn: Attention::load_fused(&w.pp("self_attn"), h, attn)?,
            post_attention_layernorm: RmsNorm::load(w, "post_attention_layernorm", h, eps, false)?,
            mlp: GatedMlp::load_fused(&w.pp("mlp"), h, c.intermediate_size, c.hidden_act)?,
        })
    })
}

/// `print(model)` of HF `Phi3ForCausalLM`, from config.json alone. The residual dropouts print
/// `resid_pdrop` (inert at inference).
pub fn describe(config: &serde_json::Value, d: &Describer, what: &str) -> Result<Description> {
    let Plan { c, spec, attn } = plan(config, what)?;
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    let p = config
        .get("resid_pdrop")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0);
    let mlp = d.gated_mlp_fused("Phi3MLP", h, c.intermediate_size, c.hidden_act);
    let self_attn = d.attention_fused("Phi3", h, &attn);
    let layer = d
        .pre_norm_layer("Phi3", h, eps, self_attn, ("mlp", mlp))
        .child("resid_attn_dropout", d.dropout(p))
        .child("resid_mlp_dropout", d.dropout(p));
    Ok(Description::new(
        d.causal_lm("Phi3", config, &spec, layer),
        &spec,
        &attn,
    ))
}

pub struct Phi3;

impl Architecture for Phi3 {
    const NAME: &'static std::ffi::CStr = c"phi3";
    const MODEL_TYPES: &'static std::ffi::CStr = c"[\"phi3\"]";
    type Model<B: LlmBackend> = Phi3ForCausalLM<B>;
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

llm_core::export_backend!(Phi3);
