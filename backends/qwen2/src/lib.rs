//! Qwen2 (Qwen2, Qwen2.5). Port of HF `transformers/models/qwen2/modeling_qwen2.py`: the Llama
//! layer with biases on q/k/v (not o), and sliding-window attention on the layers `layer_types`
//! marks (`use_sliding_window` from `max_window_layers` on).

use llm_core::LlmBackend;
use llm_core::{
    parse_config, Activation, Architecture, Attention, AttentionConfig, CausalDecoder, CoreError,
    DecoderSpec, Describer, Description, GatedMlp, LoadCtx, LoadOptions, PreNormLayer, Result,
    RmsNorm, RopeFields, GATE_UP_DOWN,
};
use serde::Deserialize;

/// config.json of a Qwen2 checkpoint (HF `Qwen2Config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Qwen2Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
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
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Sliding-window attention on (on the layers from `max_window_layers` on).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The window, used when `use_sliding_window` (HF ignores it otherwise, and so do we).
    pub sliding_window: Option<usize>,
    #[serde(default = "default_max_window_layers")]
    pub max_window_layers: usize,
    /// "full_attention" / "sliding_attention" per layer (transformers >= 4.53 writes it);
    /// derived from the two fields above when absent, and checked against them when present.
    pub layer_types: Option<Vec<String>>,
}

fn default_act() -> Activation {
    Activation::Silu
}
fn default_max_pos() -> usize {
    32768
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_window_layers() -> usize {
    28
}

impl Qwen2Config {
    fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The sliding window of each layer (None = full attention).
    fn windows(&self, what: &str) -> Result<Vec<Option<usize>>> {
        let derived: Vec<bool> = (0..self.num_hidden_layers)
            .map(|i| self.use_sliding_window && i >= self.max_window_layers)
            .collect();
        let sliding = match &self.layer_types {
            None => derived,
            Some(types) => {
                if types.len() != self.num_hidden_layers {
                    return Err(CoreError::invalid(format!(
                        "{what}: layer_types has {} entries for {} layers",
                        types.len(),
                        self.num_hidden_layers
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "full_attention" => Ok(false),
                        "sliding_attention" => Ok(true),
                        other => Err(CoreError::invalid(format!(
                            "{what}: unknown layer type `{other}`"
                        ))),
                    })
                    .collect::<Result<Vec<bool>>>()?
            }
        };
        sliding
            .into_iter()
            .map(|s| {
                if !s {
                    return Ok(None);
                }
                self.sliding_window.map(Some).ok_or_else(|| {
                    CoreError::invalid(format!(
                        "{what}: sliding attention without `sliding_window`"
                    ))
                })
            })
            .collect()
    }
}

/// HF `Qwen2ForCausalLM`.
pub type Qwen2ForCausalLM<B> = CausalDecoder<B, PreNormLayer<B>>;

/// The derived shapes `load` and `describe` share. `attn` is layer 0's; `windows` per layer.
struct Plan {
    c: Qwen2Config,
    spec: DecoderSpec,
    attn: AttentionConfig,
    windows: Vec<Option<usize>>,
}

fn plan(config: &serde_json::Value, what: &str) -> Result<Plan> {
    let c: Qwen2Config = parse_config(config, what)?;
    if c.hidden_act != Activation::Silu {
        return Err(CoreError::invalid(format!(
            "{what}: hidden_act must be silu for qwen2"
        )));
    }
    let windows = c.windows(what)?;
    let rope = RopeFields {
        rope_theta: c.rope_theta,
        rope_scaling: c.rope_scaling.clone(),
        rope_parameters: c.rope_parameters.clone(),
    }
    .resolve(10_000.0, what)?;
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
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
        num_key_value_heads: c.num_kv_heads(),
        embed_scale: None,
        final_logit_softcap: None,
    };
    let attn = AttentionConfig {
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_kv_heads(),
        head_dim,
        scale: (head_dim as f64).powf(-0.5),
        softcap: None,
        sliding_window: windows.first().copied().flatten(),
    };
    Ok(Plan {
        c,
        spec,
        attn,
        windows,
    })
}

pub fn load<B: LlmBackend>(
    config: &serde_json::Value,
    ctx: &LoadCtx<'_, B>,
    opts: &LoadOptions,
) -> Result<Qwen2ForCausalLM<B>> {
    let Plan {
        c,
        spec,
        attn,
        windows,
    } = plan(config, &ctx.source)?;
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    CausalDecoder::load(ctx, opts, spec, |w, i| {
        let attn = AttentionConfig {
            sliding_window: windows[i],
            ..attn
        };
        Ok(PreNormLayer {
            input_layernorm: RmsNorm::load(w, "input_layernorm", h, eps, false)?,
            // Qwen2Attention: q/k/v with bias, o_proj without.
            self_attn: Attention::load(&w.pp("self_attn"), h, attn, true, false)?,
            post_attention_layernorm: RmsNorm::load(w, "post_attention_layernorm", h, eps, false)?,
            mlp: GatedMlp::load(
                &w.pp("mlp"),
                GATE_UP_DOWN,
                h,
                c.intermediate_size,
                c.hidden_act,
                false,
            )?,
        })
    })
}

/// `print(model)` of HF `Qwen2ForCausalLM`, from config.json alone.
pub fn describe(config: &serde_json::Value, d: &Describer, what: &str) -> Result<Description> {
    let Plan { c, spec, attn, .. } = plan(config, what)?;
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    let mlp = d.gated_mlp(
        "Qwen2MLP",
        GATE_UP_DOWN,
        h,
        c.intermediate_size,
        c.hidden_act,
        false,
    );
    // Qwen2Attention: q/k/v with bias, o_proj without.
    let self_attn = d.attention("Qwen2", h, &attn, true, false);
    let layer = d.pre_norm_layer("Qwen2", h, eps, self_attn, ("mlp", mlp));
    Ok(Description::new(
        d.causal_lm("Qwen2", config, &spec, layer),
        &spec,
        &attn,
    ))
}

pub struct Qwen2;

impl Architecture for Qwen2 {
    const NAME: &'static std::ffi::CStr = c"qwen2";
    const MODEL_TYPES: &'static std::ffi::CStr = c"[\"qwen2\"]";
    type Model<B: LlmBackend> = Qwen2ForCausalLM<B>;
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

llm_core::export_backend!(Qwen2);
