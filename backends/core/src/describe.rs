//! The model as PyTorch sees it, computed from config.json alone: the module tree exactly as
//! `print(model)` shows the HF model (transformers 4.48.3, bf16 or bitsandbytes NF4), the
//! parameter count, and the memory footprint as `model.get_memory_footprint()` counts it.
//!
//! Nothing here reads weights, so a 16 GB checkpoint can be described (and checked against the
//! device's free memory) before it is downloaded. An architecture crate builds its tree from the
//! same derived config its `load` uses, with the builders below; the rendering is PyTorch's
//! `Module.__repr__` and `ModuleList.__repr__` (torch/nn/modules/module.py, container.py).

use serde_json::Value;

use crate::attention::AttentionConfig;
use crate::config::Activation;
use crate::model::DecoderSpec;

/// One parameter (or buffer) as `get_memory_footprint` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// A floating-point tensor in the compute dtype (bf16: 2 bytes per element).
    Float(u64),
    /// A bnb `Params4bit`: `numel` weights stored as `ceil(numel / 2)` bytes (`uint8`).
    /// The quant state (absmax, code book) is an attribute, not a parameter, so it does not count.
    Nf4(u64),
    /// An f32 parameter: the bias of a `Linear4bit` (transformers builds the replacement layer
    /// in f32 and loads the checkpoint's bias into it without a cast).
    F32(u64),
    /// An f32 buffer (rotary `inv_freq`): in the footprint, not in the parameter count.
    F32Buffer(u64),
}

/// A node of the module tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    /// The class name PyTorch prints (`LlamaAttention`, `Linear4bit`).
    pub class: String,
    /// `extra_repr()`: what a leaf prints between its parentheses.
    pub extra: Option<String>,
    pub children: Vec<(String, Module)>,
    /// Parameters and buffers held directly by this module (not by children). A tied `lm_head`
    /// holds none: `parameters()` yields the shared tensor once, under `embed_tokens`.
    pub params: Vec<Param>,
    /// `nn.ModuleList`: children are indexed and identical runs are folded (`(0-31): 32 x ...`).
    pub is_list: bool,
}

impl Module {
    pub fn new(class: impl Into<String>) -> Module {
        Module {
            class: class.into(),
            extra: None,
            children: Vec::new(),
            params: Vec::new(),
            is_list: false,
        }
    }

    pub fn extra(mut self, extra: impl Into<String>) -> Module {
        self.extra = Some(extra.into());
        self
    }

    pub fn child(mut self, name: impl Into<String>, m: Module) -> Module {
        self.children.push((name.into(), m));
        self
    }

    pub fn param(mut self, p: Param) -> Module {
        self.params.push(p);
        self
    }

    /// `nn.ModuleList(items)`.
    pub fn list(items: impl IntoIterator<Item = Module>) -> Module {
        let mut m = Module::new("ModuleList");
        m.is_list = true;
        m.children = items
            .into_iter()
            .enumerate()
            .map(|(i, x)| (i.to_string(), x))
            .collect();
        m
    }

    /// `repr(module)`.
    pub fn render(&self) -> String {
        if self.is_list {
            return self.render_list();
        }
        let mut lines: Vec<String> = self
            .extra
            .iter()
            .flat_map(|e| e.split('\n').map(str::to_string))
            .collect();
        let n_extra = lines.len();
        lines.extend(
            self.children
                .iter()
                .map(|(k, m)| add_indent(&format!("({k}): {}", m.render()), 2)),
        );
        let mut s = format!("{}(", self.class);
        if n_extra == 1 && self.children.is_empty() {
            s.push_str(&lines[0]);
        } else if !lines.is_empty() {
            s.push_str("\n  ");
            s.push_str(&lines.join("\n  "));
            s.push('\n');
        }
        s.push(')');
        s
    }

    /// `ModuleList.__repr__`: runs of equal reprs are printed once, as `(a-b): n x <repr>`.
    fn render_list(&self) -> String {
        if self.children.is_empty() {
            return format!("{}()", self.class);
        }
        let reprs: Vec<String> = self.children.iter().map(|(_, m)| m.render()).collect();
        let mut runs: Vec<(usize, usize, &str)> = Vec::new();
        for (i, r) in reprs.iter().enumerate() {
            match runs.last_mut() {
                Some(last) if last.2 == r => last.1 = i,
                _ => runs.push((i, i, r)),
            }
        }
        let lines: Vec<String> = runs
            .iter()
            .map(|&(a, b, r)| {
                let s = if a == b {
                    format!("({a}): {r}")
                } else {
                    format!("({a}-{b}): {} x {r}", b - a + 1)
                };
                add_indent(&s, 2)
            })
            .collect();
        format!("{}(\n  {}\n)", self.class, lines.join("\n  "))
    }

    fn walk_params(&self, f: &mut impl FnMut(Param)) {
        self.params.iter().for_each(|&p| f(p));
        for (_, c) in &self.children {
            c.walk_params(f);
        }
    }

    /// `sum(p.numel() for p in model.parameters())` of the unquantized model (an NF4 weight
    /// counts its logical elements, not its packed bytes).
    pub fn num_params(&self) -> u64 {
        let mut n = 0;
        self.walk_params(&mut |p| match p {
            Param::Float(k) | Param::Nf4(k) | Param::F32(k) => n += k,
            Param::F32Buffer(_) => {}
        });
        n
    }

    /// `get_memory_footprint()`: parameters and buffers, `numel * element_size` each, with
    /// floats in a `float_bytes`-wide dtype (2 for bf16).
    pub fn footprint(&self, float_bytes: u64) -> u64 {
        let mut n = 0;
        self.walk_params(&mut |p| match p {
            Param::Float(k) => n += k * float_bytes,
            Param::Nf4(k) => n += k.div_ceil(2),
            Param::F32(k) | Param::F32Buffer(k) => n += 4 * k,
        });
        n
    }

    /// Bytes the weights take as this crate stores them on a device computing in a
    /// `float_bytes`-wide dtype: NF4 weights as packed codes + double-quantized absmax (one code
    /// per 64 weights, an f32 scale per 256 blocks, the two code books: `Nf4Weight::stored_bytes`),
    /// everything else in the compute dtype. Buffers are recomputed tables, not counted.
    pub fn device_bytes(&self, float_bytes: u64) -> u64 {
        let mut n = 0;
        self.walk_params(&mut |p| match p {
            Param::Float(k) | Param::F32(k) => n += k * float_bytes,
            Param::Nf4(k) => {
                let blocks = k.div_ceil(64);
                n += k.div_ceil(2) + 16 * 4 + blocks + blocks.div_ceil(256) * 4 + 256 * 4
            }
            Param::F32Buffer(_) => {}
        });
        n
    }
}

/// torch's `_addindent`: indent every line but the first.
fn add_indent(s: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    let mut lines = s.split('\n');
    let first = lines.next().unwrap_or_default().to_string();
    lines.fold(first, |acc, l| format!("{acc}\n{pad}{l}"))
}

/// Python's `repr(float)`: shortest round-trip digits; scientific with a two-digit exponent
/// below 1e-4 and from 1e16 on (`1e-05`, `0.0`, `2.5`).
pub fn py_float(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let e = x.abs().log10().floor() as i32;
    if (-4..16).contains(&e) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let s = format!("{x:e}");
        let (mant, exp) = s.split_once('e').expect("{:e} has an exponent");
        let exp: i32 = exp.parse().expect("integer exponent");
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    }
}

/// The seed's printout: `f"Memory footprint: {bytes / 1e6:,.1f} MB"`.
pub fn footprint_text(bytes: u64) -> String {
    let tenths = ((bytes as f64) / 1e5).round() as u64;
    let (whole, frac) = (tenths / 10, tenths % 10);
    let digits = whole.to_string();
    let mut grouped = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    format!("Memory footprint: {grouped}.{frac} MB")
}

/// A model described from its config.
#[derive(Debug, Clone)]
pub struct Description {
    pub tree: Module,
    /// K and V values one position adds to the cache, over all layers.
    pub kv_values_per_token: u64,
    pub max_position_embeddings: usize,
}

impl Description {
    pub fn new(tree: Module, spec: &DecoderSpec, attn: &AttentionConfig) -> Description {
        Description {
            tree,
            kv_values_per_token: (2 * spec.num_hidden_layers * attn.num_kv_heads * attn.head_dim)
                as u64,
            max_position_embeddings: spec.max_position_embeddings,
        }
    }
}

/// Builders for the HF modules every architecture is made of. `quantized` makes every linear of
/// the decoder layers a `Linear4bit` (bnb skips `lm_head`), as `load_in_4bit` does.
#[derive(Debug, Clone, Copy)]
pub struct Describer {
    pub quantized: bool,
}

impl Describer {
    /// `nn.Linear` or bnb `Linear4bit` (`in_features=…, out_features=…, bias=…`).
    pub fn linear(&self, in_features: usize, out_features: usize, bias: bool) -> Module {
        let n = (in_features * out_features) as u64;
        let mut m = Module::new(if self.quantized {
            "Linear4bit"
        } else {
            "Linear"
        })
        .extra(format!(
            "in_features={in_features}, out_features={out_features}, bias={}",
            if bias { "True" } else { "False" }
        ))
        .param(if self.quantized {
            Param::Nf4(n)
        } else {
            Param::Float(n)
        });
        if bias {
            let b = out_features as u64;
            m = m.param(if self.quantized {
                Param::F32(b)
            } else {
                Param::Float(b)
            });
        }
        m
    }

    /// `{prefix}RMSNorm((dim,), eps=…)`.
    pub fn rms_norm(&self, prefix: &str, dim: usize, eps: f64) -> Module {
        Module::new(format!("{prefix}RMSNorm"))
            .extra(format!("({dim},), eps={}", py_float(eps)))
            .param(Param::Float(dim as u64))
    }

    /// The activation module HF's `ACT2FN` builds.
    pub fn activation(&self, act: Activation) -> Module {
        Module::new(match act {
            Activation::Silu => "SiLU",
            Activation::GeluTanh => "PytorchGELUTanh",
        })
    }

    /// `{prefix}Attention` with separate `q_proj`, `k_proj`, `v_proj`, `o_proj` (HF
    /// `LlamaAttention.__init__` order).
    pub fn attention(
        &self,
        prefix: &str,
        hidden: usize,
        cfg: &AttentionConfig,
        qkv_bias: bool,
        o_bias: bool,
    ) -> Module {
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        Module::new(format!("{prefix}Attention"))
            .child("q_proj", self.linear(hidden, q, qkv_bias))
            .child("k_proj", self.linear(hidden, kv, qkv_bias))
            .child("v_proj", self.linear(hidden, kv, qkv_bias))
            .child("o_proj", self.linear(q, hidden, o_bias))
    }

    /// `{prefix}Attention` with one fused `qkv_proj` (HF `Phi3Attention`: `o_proj` first).
    pub fn attention_fused(&self, prefix: &str, hidden: usize, cfg: &AttentionConfig) -> Module {
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        Module::new(format!("{prefix}Attention"))
            .child("o_proj", self.linear(q, hidden, false))
            .child("qkv_proj", self.linear(hidden, q + 2 * kv, false))
    }

    /// A gated MLP: `[gate, up, down]` named as the checkpoint names them, then `act_fn`.
    pub fn gated_mlp(
        &self,
        class: &str,
        names: [&str; 3],
        hidden: usize,
        intermediate: usize,
        act: Activation,
        bias: bool,
    ) -> Module {
        Module::new(class)
            .child(names[0], self.linear(hidden, intermediate, bias))
            .child(names[1], self.linear(hidden, intermediate, bias))
            .child(names[2], self.linear(intermediate, hidden, bias))
            .child("act_fn", self.activation(act))
    }

    /// Phi-3's MLP: one fused `gate_up_proj`, `down_proj`, `activation_fn`.
    pub fn gated_mlp_fused(
        &self,
        class: &str,
        hidden: usize,
        intermediate: usize,
        act: Activation,
    ) -> Module {
        Module::new(class)
            .child("gate_up_proj", self.linear(hidden, 2 * intermediate, false))
            .child("down_proj", self.linear(intermediate, hidden, false))
            .child("activation_fn", self.activation(act))
    }

    /// HF `LlamaDecoderLayer` and its kin: `self_attn`, the feed-forward block under its
    /// checkpoint name (`mlp`, Mixtral's `block_sparse_moe`), then the two norms.
    pub fn pre_norm_layer(
        &self,
        prefix: &str,
        hidden: usize,
        eps: f64,
        self_attn: Module,
        (ffn_name, ffn): (&str, Module),
    ) -> Module {
        Module::new(format!("{prefix}DecoderLayer"))
            .child("self_attn", self_attn)
            .child(ffn_name, ffn)
            .child("input_layernorm", self.rms_norm(prefix, hidden, eps))
            .child(
                "post_attention_layernorm",
                self.rms_norm(prefix, hidden, eps),
            )
    }

    /// `nn.Dropout(p)` (inert at inference, but printed).
    pub fn dropout(&self, p: f64) -> Module {
        Module::new("Dropout").extra(format!("p={}, inplace=False", py_float(p)))
    }

    /// `{prefix}ForCausalLM` → `{prefix}Model` (embed_tokens, `num_hidden_layers` copies of
    /// `layer`, norm, rotary_emb) and `lm_head`, as in transformers 4.48. `config` is the raw
    /// config.json: its `pad_token_id` is the embedding's `padding_idx`.
    pub fn causal_lm(
        &self,
        prefix: &str,
        config: &Value,
        spec: &DecoderSpec,
        layer: Module,
    ) -> Module {
        let (v, h) = (spec.vocab_size, spec.hidden_size);
        let pad = config.get("pad_token_id").and_then(Value::as_u64);
        let embed = Module::new("Embedding")
            .extra(match pad {
                Some(p) => format!("{v}, {h}, padding_idx={p}"),
                None => format!("{v}, {h}"),
            })
            .param(Param::Float((v * h) as u64));
        // `inv_freq` is an f32 buffer of head_dim / 2 entries (`_compute_default_rope_parameters`).
        let rotary = Module::new(format!("{prefix}RotaryEmbedding"))
            .param(Param::F32Buffer((spec.head_dim / 2) as u64));
        let model = Module::new(format!("{prefix}Model"))
            .child("embed_tokens", embed)
            .child(
                "layers",
                Module::list(std::iter::repeat_n(layer, spec.num_hidden_layers)),
            )
            .child("norm", self.rms_norm(prefix, h, spec.rms_norm_eps))
            .child("rotary_emb", rotary);
        // bnb never quantizes the head.
        let mut lm_head = Describer { quantized: false }.linear(h, v, false);
        if spec.tie_word_embeddings {
            lm_head.params.clear();
        }
        Module::new(format!("{prefix}ForCausalLM"))
            .child("model", model)
            .child("lm_head", lm_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        for (x, s) in [
            (1e-5, "1e-05"),
            (1e-6, "1e-06"),
            (0.0, "0.0"),
            (2.5, "2.5"),
            (1.0, "1.0"),
            (0.0001, "0.0001"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
        ] {
            assert_eq!(py_float(x), s, "{x}");
        }
    }

    #[test]
    fn footprint_text_groups_thousands() {
        assert_eq!(
            footprint_text(5_591_539_968),
            "Memory footprint: 5,591.5 MB"
        );
        assert_eq!(footprint_text(168_608), "Memory footprint: 0.2 MB");
        assert_eq!(
            footprint_text(23_745_011_968),
            "Memory footprint: 23,745.0 MB"
        );
    }

    #[test]
    fn module_list_folds_equal_runs() {
        let leaf = |c: &str| Module::new(c);
        let l = Module::list([leaf("A"), leaf("A"), leaf("B"), leaf("A")]);
        assert_eq!(
            l.render(),
            "ModuleList(\n  (0-1): 2 x A()\n  (2): B()\n  (3): A()\n)"
        );
        assert_eq!(Module::list([]).render(), "ModuleList()");
    }
}
