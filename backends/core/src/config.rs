//! Strict config.json parsing: every field is used or rejected.
//!
//! An architecture's `Config` is a serde struct with `deny_unknown_fields`. Before it is
//! deserialized, [`parse_config`] removes the keys listed in [`INERT_KEYS`]: fields that by
//! construction cannot change what an inference forward computes (training-only settings,
//! bookkeeping) or that the server consumes instead of the plugin. Everything else must be a field
//! of the architecture's Config, so an unknown key (a new rope variant, a sliding window flag) is
//! a load error naming the key, never a silently wrong model.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{CoreError, Result};

/// Keys that are inert for the forward pass, each with the reason.
pub const INERT_KEYS: &[(&str, &str)] = &[
    ("architectures", "the HF class name; model_type selects the architecture"),
    ("transformers_version", "bookkeeping"),
    ("_name_or_path", "bookkeeping"),
    ("_from_model_config", "bookkeeping"),
    ("torch_dtype", "storage dtype; each tensor's own dtype is read from the file and compute is f32 (CPU) or bf16 (CUDA)"),
    ("dtype", "transformers 5 spelling of torch_dtype"),
    ("initializer_range", "training-time initialization"),
    ("use_cache", "the KV cache is always used"),
    ("attention_dropout", "dropout is off at inference"),
    ("hidden_dropout", "dropout is off at inference"),
    ("embd_pdrop", "dropout is off at inference"),
    ("resid_pdrop", "dropout is off at inference (describe prints it as Phi-3's `Dropout(p=…)`)"),
    ("output_attentions", "HF output plumbing"),
    ("output_hidden_states", "HF output plumbing"),
    ("return_dict", "HF output plumbing"),
    ("bos_token_id", "read by the server's tokenizer setup, not by the forward pass"),
    ("eos_token_id", "read by the server (stop tokens), not by the forward pass"),
    ("pad_token_id", "sequences run unpadded; describe prints it as the embedding's `padding_idx`"),
    ("unk_token_id", "tokenizer concern"),
    ("pretraining_tp", "HF slices the matmuls by it only to mimic training numerics; the math is the same"),
];

/// Remove inert keys and deserialize the rest strictly. `what` names the file in errors.
pub fn parse_config<T: DeserializeOwned>(value: &Value, what: &str) -> Result<T> {
    let mut obj = value
        .as_object()
        .cloned()
        .ok_or_else(|| CoreError::invalid(format!("{what}: config is not a JSON object")))?;
    for (k, _) in INERT_KEYS {
        obj.remove(*k);
    }
    // Validated and used by the loader (`BnbConfig::parse`), not by the architecture.
    obj.remove("quantization_config");
    serde_json::from_value(Value::Object(obj))
        .map_err(|e| CoreError::invalid(format!("{what}: {e}")))
}

/// Rotary embedding settings as config.json spells them: `rope_theta` + `rope_scaling`
/// (transformers 4) or `rope_parameters` (transformers 5). Architectures flatten these fields
/// into their Config.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeFields {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
}

/// The rope variants implemented in [`crate::rope`].
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// HF `_compute_llama3_parameters`.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// HF `_compute_linear_scaling_rope_parameters`: positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Per-frequency divisors stored in a GGUF's `rope_freqs.weight` (llama.cpp's form of llama3).
    FreqFactors,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeFields {
    /// Resolve to one [`RopeConfig`]; `default_theta` is the HF class default.
    pub fn resolve(&self, default_theta: f64, what: &str) -> Result<RopeConfig> {
        let (theta, scaling) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(_), Some(_)) => {
                return Err(CoreError::invalid(format!(
                    "{what}: both `rope_parameters` and `rope_scaling` are set"
                )))
            }
            (Some(p), None) => {
                let theta = p.get("rope_theta").and_then(Value::as_f64);
                if theta.is_some() && self.rope_theta.is_some() {
                    return Err(CoreError::invalid(format!(
                        "{what}: `rope_theta` is given both at top level and in `rope_parameters`"
                    )));
                }
                (theta.or(self.rope_theta), Some(p.clone()))
            }
            (None, s) => (self.rope_theta, s.clone()),
        };
        let theta = theta.unwrap_or(default_theta);
        let scaling = match scaling {
            None | Some(Value::Null) => RopeScaling::Default,
            Some(v) => parse_scaling(&v, what)?,
        };
        Ok(RopeConfig { theta, scaling })
    }
}

fn parse_scaling(v: &Value, what: &str) -> Result<RopeScaling> {
    let obj = v
        .as_object()
        .ok_or_else(|| CoreError::invalid(format!("{what}: `rope_scaling` is not an object")))?;
    // transformers accepts the legacy key `type` too.
    let ty = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let allowed: &[&str] = match ty {
        "default" => &[],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        "linear" => &["factor"],
        "gguf_freq_factors" => &[],
        other => {
            return Err(CoreError::unimplemented(format!(
                "{what}: rope scaling type `{other}` is not implemented (default, linear and llama3 are)"
            )))
        }
    };
    for k in obj.keys() {
        if !matches!(k.as_str(), "rope_type" | "type" | "rope_theta")
            && !allowed.contains(&k.as_str())
        {
            return Err(CoreError::invalid(format!(
                "{what}: rope scaling field `{k}` is not used by rope type `{ty}`"
            )));
        }
    }
    let num = |k: &str| -> Result<f64> {
        obj.get(k).and_then(Value::as_f64).ok_or_else(|| {
            CoreError::invalid(format!("{what}: rope scaling `{ty}` needs a number `{k}`"))
        })
    };
    Ok(match ty {
        "default" => RopeScaling::Default,
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        _ => RopeScaling::FreqFactors,
    })
}

/// `hidden_act` values and what they compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    #[serde(rename = "silu")]
    Silu,
    /// GELU with the tanh approximation (HF `gelu_pytorch_tanh`).
    #[serde(rename = "gelu_pytorch_tanh")]
    GeluTanh,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tiny {
        hidden_size: usize,
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let err = parse_config::<Tiny>(
            &json!({"hidden_size": 4, "sliding_window": 8}),
            "x/config.json",
        )
        .unwrap_err();
        assert!(err.message.contains("sliding_window"), "{}", err.message);
        assert!(err.message.contains("x/config.json"), "{}", err.message);
        // Inert keys are fine.
        let t = parse_config::<Tiny>(&json!({"hidden_size": 4, "use_cache": true}), "x").unwrap();
        assert_eq!(t.hidden_size, 4);
    }

    #[test]
    fn rope_variants() {
        let f = RopeFields {
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: Some(json!({"rope_theta": 100000.0, "rope_type": "default"})),
        };
        assert_eq!(f.resolve(10000.0, "x").unwrap().theta, 100000.0);
        let f = RopeFields {
            rope_theta: Some(1.0),
            rope_scaling: Some(json!({"rope_type": "yarn", "factor": 4.0})),
            rope_parameters: None,
        };
        let e = f.resolve(10000.0, "x").unwrap_err();
        assert!(e.message.contains("yarn"));
    }
}

/// `quantization_config` of a pre-quantized bitsandbytes checkpoint. Every key is used or
/// rejected: only the 4-bit NF4 layout with uint8 storage is implemented.
#[derive(Debug, Clone, PartialEq)]
pub struct BnbConfig {
    pub double_quant: bool,
    /// Module names bnb left unquantized (`llm_int8_skip_modules`); their weights are float.
    pub skip_modules: Vec<String>,
}

impl BnbConfig {
    /// None for a checkpoint without `quantization_config`.
    pub fn parse(config: &Value, what: &str) -> Result<Option<BnbConfig>> {
        let Some(q) = config.get("quantization_config") else {
            return Ok(None);
        };
        let obj = q.as_object().ok_or_else(|| {
            CoreError::invalid(format!("{what}: `quantization_config` is not an object"))
        })?;
        let method = obj
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("");
        if method != "bitsandbytes" {
            return Err(CoreError::unimplemented(format!(
                "{what}: quantization_config.quant_method `{method}` is not supported (bitsandbytes is)"
            )));
        }
        let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
        if flag("load_in_8bit") || !flag("load_in_4bit") {
            return Err(CoreError::unimplemented(format!(
                "{what}: only 4-bit bitsandbytes checkpoints are supported (load_in_4bit)"
            )));
        }
        let mut cfg = BnbConfig {
            double_quant: false,
            skip_modules: Vec::new(),
        };
        for (k, v) in obj {
            match k.as_str() {
                "quant_method" | "load_in_4bit" | "load_in_8bit" => {}
                "bnb_4bit_quant_type" => {
                    if v.as_str() != Some("nf4") {
                        return Err(CoreError::unimplemented(format!(
                            "{what}: bnb_4bit_quant_type {v} is not supported (nf4 is)"
                        )));
                    }
                }
                "bnb_4bit_use_double_quant" => cfg.double_quant = v.as_bool().unwrap_or(false),
                // The compute dtype is the device's (f32 on CPU, bf16 on CUDA), as requested by
                // the seed's config; any other value would only change rounding of activations.
                "bnb_4bit_compute_dtype" => match v.as_str() {
                    Some("bfloat16" | "float16" | "float32") => {}
                    _ => {
                        return Err(CoreError::invalid(format!(
                            "{what}: bnb_4bit_compute_dtype {v}"
                        )))
                    }
                },
                "bnb_4bit_quant_storage" => {
                    if v.as_str() != Some("uint8") {
                        return Err(CoreError::unimplemented(format!(
                            "{what}: bnb_4bit_quant_storage {v} is not supported (uint8 is)"
                        )));
                    }
                }
                "llm_int8_skip_modules" => {
                    cfg.skip_modules = v
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|s| s.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                }
                // 8-bit (LLM.int8) settings: no effect on a 4-bit checkpoint.
                "llm_int8_threshold"
                | "llm_int8_has_fp16_weight"
                | "llm_int8_enable_fp32_cpu_offload" => {}
                other => {
                    return Err(CoreError::invalid(format!(
                        "{what}: quantization_config field `{other}` is not supported"
                    )))
                }
            }
        }
        Ok(Some(cfg))
    }
}
