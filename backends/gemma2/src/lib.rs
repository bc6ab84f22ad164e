//! Gemma-2. Port of HF `transformers/models/gemma2/modeling_gemma2.py`: embeddings scaled by
//! sqrt(hidden_size), `(1 + w)` RMSNorms, four norms per layer (sandwiching attention and MLP),
//! GELU-tanh MLP, `query_pre_attn_scalar` attention scale, attention and final logit soft-capping,
//! sliding-window attention on alternating layers, tied LM head.

use burn_tensor::Tensor;
use llm_core::attention::LayerKv;
use llm_core::LlmBackend;
use llm_core::{
    parse_config, Activation, Architecture, Attention, AttentionConfig, CausalDecoder, CoreError,
    DecoderLayer, DecoderSpec, Describer, Description, ForwardCtx, GatedMlp, Linear, LoadCtx,
    LoadOptions, Module, Result, RmsNorm, RopeFields, GATE_UP_DOWN,
};
use serde::Deserialize;

/// config.json of a Gemma-2 checkpoint (HF `Gemma2Config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gemma2Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// The MLP activation HF uses.
    #[serde(default = "default_act")]
    pub hidden_activation: Activation,
    /// Legacy duplicate of `hidden_activation` in hub configs: must agree with it.
    pub hidden_act: Option<Activation>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    /// Attention scores are scaled by `query_pre_attn_scalar ** -0.5` (not head_dim).
    pub query_pre_attn_scalar: f64,
    pub sliding_window: Option<usize>,
    /// "sliding_attention" / "full_attention" per layer; default: even layers slide.
    pub layer_types: Option<Vec<String>>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// HF generation's cache class choice ("hybrid"); masking here already follows layer_types.
    #[allow(dead_code)]
    cache_implementation: Option<String>,
    /// transformers 5: must be null/false (causal attention).
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
}

fn default_act() -> Activation {
    Activation::GeluTanh
}
fn default_max_pos() -> usize {
    8192
}
fn default_eps() -> f64 {
    1e-6
}
fn yes() -> bool {
    true
}

/// HF `Gemma2DecoderLayer`: norms before and after both attention and MLP.
pub struct Gemma2DecoderLayer<B: LlmBackend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub pre_feedforward_layernorm: RmsNorm<B>,
    pub mlp: GatedMlp<B>,
    pub post_feedforward_layernorm: RmsNorm<B>,
}

impl<B: LlmBackend> DecoderLayer<B> for Gemma2DecoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 2>,
        ctx: &ForwardCtx<B>,
        kv: &mut [&mut Option<LayerKv<B>>],
    ) -> Tensor<B, 2> {
        let h = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), ctx, kv);
        let x = x + self.post_attention_layernorm.forward(h);
        let h = self
            .mlp
            .forward(self.pre_feedforward_layernorm.forward(x.clone()));
        x + self.post_feedforward_layernorm.forward(h)
    }
    fn num_params(&self) -> usize {
        self.input_layernorm.num_params()
            + self.self_attn.num_params()
            + self.post_attention_layernorm.num_params()
            + self.pre_feedforward_layernorm.num_params()
            + self.mlp.num_params()
            + self.post_feedforward_layernorm.num_params()
    }
    fn linears(&self, prefix: &str) -> Vec<(String, &dyn Linear<B>)> {
        let mut v = self.self_attn.linears(&format!("{prefix}.self_attn"));
        v.extend(self.mlp.linears(&format!("{prefix}.mlp")));
        v
    }
}

/// HF `Gemma2ForCausalLM`.
pub type Gemma2ForCausalLM<B> = CausalDecoder<B, Gemma2DecoderLayer<B>>;

/// The derived shapes `load` and `describe` share. `attn` is a full-attention layer's;
/// `sliding` marks the sliding-window layers.
struct Plan {
    c: Gemma2Config,
    spec: DecoderSpec,
    attn: AttentionConfig,
    sliding: Vec<bool>,
}

fn plan(config: &serde_json::Value, what: &str) -> Result<Plan> {
    let c: Gemma2Config = parse_config(config, what)?;
    if c.hidden_act.is_some_and(|a| a != c.hidden_activation) {
        return Err(CoreError::invalid(format!(
            "{what}: hidden_act and hidden_activation disagree"
        )));
    }
    if c.use_bidirectional_attention == Some(true) {
        return Err(CoreError::unimplemented(format!(
            "{what}: use_bidirectional_attention is not supported"
        )));
    }
    let sliding: Vec<bool> = match &c.layer_types {
        Some(types) => {
            if types.len() != c.num_hidden_layers {
                return Err(CoreError::invalid(format!(
                    "{what}: layer_types has {} entries",
                    types.len()
                )));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(CoreError::invalid(format!(
                        "{what}: unknown layer type `{other}`"
                    ))),
                })
                .collect::<Result<_>>()?
        }
        // HF: `"sliding_attention" if bool((i + 1) % 2) else "full_attention"`.
        None => (0..c.num_hidden_layers).map(|i| (i + 1) % 2 == 1).collect(),
    };
    if sliding.iter().any(|&s| s) && c.sliding_window.is_none() {
        return Err(CoreError::invalid(format!(
            "{what}: sliding layers need `sliding_window`"
        )));
    }
    let rope = RopeFields {
        rope_theta: c.rope_theta,
        rope_scaling: c.rope_scaling.clone(),
        rope_parameters: c.rope_parameters.clone(),
    }
    .resolve(10_000.0, what)?;
    let spec = DecoderSpec {
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        num_hidden_layers: c.num_hidden_layers,
        rms_norm_eps: c.rms_norm_eps,
        norm_unit_offset: true,
        tie_word_embeddings: c.tie_word_embeddings,
        max_position_embeddings: c.max_position_embeddings,
        rope,
        head_dim: c.head_dim,
        num_key_value_heads: c.num_key_value_heads,
        // HF: hidden_states * torch.tensor(hidden_size**0.5, dtype=hidden_states.dtype).
        embed_scale: Some((c.hidden_size as f64).sqrt() as f32),
        final_logit_softcap: c.final_logit_softcapping,
    };
    let attn = AttentionConfig {
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        scale: c.query_pre_attn_scalar.powf(-0.5),
        softcap: c.attn_logit_softcapping,
        sliding_window: None,
    };
    Ok(Plan {
        c,
        spec,
        attn,
        sliding,
    })
}

pub fn load<B: LlmBackend>(
    config: &serde_json::Value,
    ctx: &LoadCtx<'_, B>,
    opts: &LoadOptions,
) -> Result<Gemma2ForCausalLM<B>> {
    let Plan {
        c,
        spec,
        attn,
        sliding,
    } = plan(config, &ctx.source)?;
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    CausalDecoder::load(ctx, opts, spec, |w, i| {
        let attn = AttentionConfig {
            sliding_window: if sliding[i] { c.sliding_window } else { None },
            ..attn
        };
        let norm = |name: &str| RmsNorm::load(w, name, h, eps, true);
        Ok(Gemma2DecoderLayer {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(
                &w.pp("self_attn"),
                h,
                attn,
                c.attention_bias,
                c.attention_bias,
            )?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            mlp: GatedMlp::load(
                &w.pp("mlp"),
                GATE_UP_DOWN,
                h,
                c.intermediate_size,
                c.hidden_activation,
                false,
            )?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
        })
    })
}

/// `print(model)` of HF `Gemma2ForCausalLM`, from config.json alone.
pub fn describe(config: &serde_json::Value, d: &Describer, what: &str) -> Result<Description> {
    let Plan { c, spec, attn, .. } = plan(config, what)?;
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    let ab = c.attention_bias;
    let norm = || d.rms_norm("Gemma2", h, eps);
    let layer = Module::new("Gemma2DecoderLayer")
        .child("self_attn", d.attention("Gemma2", h, &attn, ab, ab))
        .child(
            "mlp",
            d.gated_mlp(
                "Gemma2MLP",
                GATE_UP_DOWN,
                h,
                c.intermediate_size,
                c.hidden_activation,
                false,
            ),
        )
        .child("input_layernorm", norm())
        .child("post_attention_layernorm", norm())
        .child("pre_feedforward_layernorm", norm())
        .child("post_feedforward_layernorm", norm());
    Ok(Description::new(
        d.causal_lm("Gemma2", config, &spec, layer),
        &spec,
        &attn,
    ))
}

pub struct Gemma2;

impl Architecture for Gemma2 {
    const NAME: &'static std::ffi::CStr = c"gemma2";
    const MODEL_TYPES: &'static std::ffi::CStr = c"[\"gemma2\"]";
    type Model<B: LlmBackend> = Gemma2ForCausalLM<B>;
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

llm_core::export_backend!(Gemma2);
