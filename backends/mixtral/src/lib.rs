//! Mixtral. Port of HF `transformers/models/mixtral/modeling_mixtral.py`: the Mistral attention
//! (GQA, optional sliding window) and a sparse MoE block (`block_sparse_moe`: router `gate`, experts
//! `experts.E.w1/w2/w3`) with top-k softmax routing renormalized over the chosen experts.

use burn_tensor::Tensor;
use llm_core::attention::LayerKv;
use llm_core::LlmBackend;
use llm_core::{
    parse_config, Activation, Architecture, Attention, AttentionConfig, CausalDecoder, CoreError,
    DecoderLayer, DecoderSpec, Describer, Description, ForwardCtx, GatedMlp, Linear, LoadCtx,
    LoadOptions, Module, Result, RmsNorm, RopeFields, SparseMoe,
};
use serde::Deserialize;

/// config.json of a Mixtral checkpoint (HF `MixtralConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtralConfig {
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
    /// Every layer attends to the last `sliding_window` positions only, when set.
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Experts chosen per token.
    pub num_experts_per_tok: usize,
    /// Experts per layer.
    pub num_local_experts: usize,
    /// Training only (load-balancing loss / router noise in train mode): no effect on inference.
    #[allow(dead_code)]
    output_router_logits: Option<bool>,
    #[allow(dead_code)]
    router_aux_loss_coef: Option<f64>,
    #[allow(dead_code)]
    router_jitter_noise: Option<f64>,
}

fn default_act() -> Activation {
    Activation::Silu
}
fn default_max_pos() -> usize {
    4096 * 32
}
fn default_eps() -> f64 {
    1e-5
}

/// HF `MixtralDecoderLayer`.
pub struct MixtralDecoderLayer<B: LlmBackend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub block_sparse_moe: SparseMoe<B>,
}

impl<B: LlmBackend> DecoderLayer<B> for MixtralDecoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 2>,
        ctx: &ForwardCtx<B>,
        kv: &mut [&mut Option<LayerKv<B>>],
    ) -> Tensor<B, 2> {
        let x = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), ctx, kv);
        x.clone()
            + self
                .block_sparse_moe
                .forward(self.post_attention_layernorm.forward(x))
    }
    fn num_params(&self) -> usize {
        self.input_layernorm.num_params()
            + self.self_attn.num_params()
            + self.post_attention_layernorm.num_params()
            + self.block_sparse_moe.num_params()
    }
    fn linears(&self, prefix: &str) -> Vec<(String, &dyn Linear<B>)> {
        let mut v = self.self_attn.linears(&format!("{prefix}.self_attn"));
        v.extend(
            self.block_sparse_moe
                .linears(&format!("{prefix}.block_sparse_moe")),
        );
        v
    }
}

/// HF `MixtralForCausalLM`.
pub type MixtralForCausalLM<B> = CausalDecoder<B, MixtralDecoderLayer<B>>;

/// The derived shapes `load` and `describe` share.
struct Plan {
    c: MixtralConfig,
    spec: DecoderSpec,
    attn: AttentionConfig,
}

fn plan(config: &serde_json::Value, what: &str) -> Result<Plan> {
    let c: MixtralConfig = parse_config(config, what)?;
    if c.num_experts_per_tok == 0 || c.num_experts_per_tok > c.num_local_experts {
        return Err(CoreError::invalid(format!(
            "{what}: num_experts_per_tok {} must be in 1..={}",
            c.num_experts_per_tok, c.num_local_experts
        )));
    }
    if c.hidden_act != Activation::Silu {
        return Err(CoreError::invalid(format!(
            "{what}: hidden_act must be silu for mixtral"
        )));
    }
    let rope = RopeFields {
        rope_theta: c.rope_theta,
        rope_scaling: c.rope_scaling.clone(),
        rope_parameters: c.rope_parameters.clone(),
    }
    .resolve(1_000_000.0, what)?;
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
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
) -> Result<MixtralForCausalLM<B>> {
    let Plan { c, spec, attn } = plan(config, &ctx.source)?;
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    CausalDecoder::load(ctx, opts, spec, |w, _| {
        let moe = w.pp("block_sparse_moe");
        let experts = (0..c.num_local_experts)
            .map(|e| {
                GatedMlp::load(
                    &moe.pp("experts").pp(e),
                    ["w1", "w3", "w2"],
                    h,
                    c.intermediate_size,
                    c.hidden_act,
                    false,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MixtralDecoderLayer {
            input_layernorm: RmsNorm::load(w, "input_layernorm", h, eps, false)?,
            self_attn: Attention::load(&w.pp("self_attn"), h, attn, false, false)?,
            post_attention_layernorm: RmsNorm::load(w, "post_attention_layernorm", h, eps, false)?,
            block_sparse_moe: SparseMoe {
                gate: moe.linear("gate", h, c.num_local_experts, false)?,
                experts,
                top_k: c.num_experts_per_tok,
            },
        })
    })
}

/// `print(model)` of HF `MixtralForCausalLM`, from config.json alone. An expert
/// (`MixtralBlockSparseTop2MLP`) declares `w1` (gate), `w2` (down), `w3` (up) in that order.
pub fn describe(config: &serde_json::Value, d: &Describer, what: &str) -> Result<Description> {
    let Plan { c, spec, attn } = plan(config, what)?;
    let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
    let expert = Module::new("MixtralBlockSparseTop2MLP")
        .child("w1", d.linear(h, i, false))
        .child("w2", d.linear(i, h, false))
        .child("w3", d.linear(h, i, false))
        .child("act_fn", d.activation(c.hidden_act));
    let moe = Module::new("MixtralSparseMoeBlock")
        .child("gate", d.linear(h, c.num_local_experts, false))
        .child(
            "experts",
            Module::list(std::iter::repeat_n(expert, c.num_local_experts)),
        );
    let self_attn = d.attention("Mixtral", h, &attn, false, false);
    let layer = d.pre_norm_layer("Mixtral", h, eps, self_attn, ("block_sparse_moe", moe));
    Ok(Description::new(
        d.causal_lm("Mixtral", config, &spec, layer),
        &spec,
        &attn,
    ))
}

pub struct Mixtral;

impl Architecture for Mixtral {
    const NAME: &'static std::ffi::CStr = c"mixtral";
    const MODEL_TYPES: &'static std::ffi::CStr = c"[\"mixtral\"]";
    type Model<B: LlmBackend> = MixtralForCausalLM<B>;
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

llm_core::export_backend!(Mixtral);
