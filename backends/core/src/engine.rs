//! The generic serving loop body every plugin shares: sequences by id, each with its KV cache,
//! token history and RNG; one `step` appends tokens and samples.

use std::collections::HashMap;

use crate::backend::LlmBackend;
use burn_tensor::Tensor;
use llm_abi::{SamplingParams, SeqOutput};

use crate::attention::KvCache;
use crate::error::{CoreError, Result};
use crate::sampling::{sample, Rng};

/// A causal language model: what an architecture crate provides.
pub trait CausalLm<B: LlmBackend>: Send + 'static {
    /// Run `tokens` at positions `cache.len..` and append them to `cache`.
    /// Returns logits `[tokens, vocab]` when `all_logits`, else `[1, vocab]` for the last token.
    fn forward(&self, tokens: &[u32], cache: &mut KvCache<B>, all_logits: bool) -> Tensor<B, 2>;
    fn num_layers(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Positions one sequence may hold (config `max_position_embeddings`, capped by the load).
    fn max_context(&self) -> usize;
    /// Parameter count as PyTorch's `sum(p.numel())` reports it.
    fn num_params(&self) -> usize;
    fn device(&self) -> B::Device;
    /// Every linear layer with its checkpoint module name (`model.layers.0.self_attn.q_proj`).
    fn linears(&self) -> Vec<(String, &dyn crate::Linear<B>)>;
}

/// One sequence's share of a step, borrowed from the ABI call.
pub struct StepInput<'a> {
    pub seq_id: u64,
    pub tokens: &'a [u32],
    pub sample: bool,
    pub params: SamplingParams,
}

struct Seq<B: LlmBackend> {
    cache: KvCache<B>,
    history: Vec<u32>,
    rng: Option<Rng>,
}

/// The object behind a plugin's model handle, with the backend type erased.
pub trait DynEngine: Send {
    fn step(&mut self, inputs: &[StepInput<'_>], outputs: &mut [SeqOutput]) -> Result<()>;
    fn release(&mut self, seq_id: u64);
    fn info(&self) -> serde_json::Value;
    /// Drop the model and every sequence, then hand the device pool's memory back to the driver.
    fn destroy(self: Box<Self>);
}

pub struct Engine<B: LlmBackend, M: CausalLm<B>> {
    pub model: M,
    seqs: HashMap<u64, Seq<B>>,
    info: serde_json::Value,
}

impl<B: LlmBackend, M: CausalLm<B>> Engine<B, M> {
    /// `info`: architecture-specific metadata merged into [`DynEngine::info`].
    pub fn new(model: M, info: serde_json::Value) -> Self {
        Engine {
            model,
            seqs: HashMap::new(),
            info,
        }
    }

    fn step_one(&mut self, input: &StepInput<'_>) -> Result<Option<SeqOutput>> {
        let vocab = self.model.vocab_size();
        if let Some(&bad) = input.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(CoreError::invalid(format!(
                "token id {bad} is out of range: the vocabulary has {vocab} entries"
            )));
        }
        let layers = self.model.num_layers();
        let seq = self.seqs.entry(input.seq_id).or_insert_with(|| Seq {
            cache: KvCache::new(layers),
            history: Vec::new(),
            rng: None,
        });
        if seq.cache.len + input.tokens.len() > self.model.max_context() {
            return Err(CoreError::exhausted(format!(
                "sequence would hold {} positions, over the context of {}",
                seq.cache.len + input.tokens.len(),
                self.model.max_context()
            )));
        }
        if input.tokens.is_empty() {
            return Err(CoreError::invalid(
                "a step needs at least one token per sequence",
            ));
        }
        let logits = self.model.forward(input.tokens, &mut seq.cache, false);
        seq.history.extend_from_slice(input.tokens);
        if !input.sample {
            return Ok(None);
        }
        let mut row: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| CoreError::internal(format!("reading logits: {e:?}")))?;
        let rng = seq.rng.get_or_insert_with(|| Rng::new(input.params.seed));
        Ok(Some(sample(&mut row, &seq.history, &input.params, rng)))
    }
}

impl<B: LlmBackend, M: CausalLm<B>> DynEngine for Engine<B, M> {
    fn step(&mut self, inputs: &[StepInput<'_>], outputs: &mut [SeqOutput]) -> Result<()> {
        // Sequences run one after another: each result is exactly what it would be alone.
        for (input, out) in inputs.iter().zip(outputs.iter_mut()) {
            if let Some(o) = self.step_one(input)? {
                *out = o;
            }
        }
        Ok(())
    }

    fn release(&mut self, seq_id: u64) {
        self.seqs.remove(&seq_id);
    }

    fn destroy(self: Box<Self>) {
        let device = self.model.device();
        drop(self);
        // Burn/CubeCL keep freed buffers pooled; without this an unloaded model's memory stays
        // reserved until the process exits.
        let _ = B::sync(&device);
        B::memory_cleanup(&device);
    }

    fn info(&self) -> serde_json::Value {
        let elem = dtype_bytes::<B>();
        let kv_bytes: usize = self
            .seqs
            .values()
            .flat_map(|s| s.cache.layers.iter().flatten())
            .map(|l| {
                (l.k.dims().iter().product::<usize>() + l.v.dims().iter().product::<usize>()) * elem
            })
            .sum();
        let weight_bytes = weight_bytes::<B, M>(&self.model);
        // The pool's reservation beyond weights and KV: activations, code books, rope tables,
        // freed-but-pooled buffers. Only backends with a device pool report one.
        let workspace = B::pool_reserved_bytes(&self.model.device())
            .map(|r| r.saturating_sub(weight_bytes + kv_bytes as u64))
            .unwrap_or(0);
        let mut v = serde_json::json!({
            "kv_cache_bytes": kv_bytes,
            "workspace_bytes": workspace,
            "vocab_size": self.model.vocab_size(),
            "max_context": self.model.max_context(),
            "num_layers": self.model.num_layers(),
            "num_params": self.model.num_params(),
            "weight_bytes": weight_bytes,
            "active_sequences": self.seqs.len(),
        });
        if let (Some(dst), Some(src)) = (v.as_object_mut(), self.info.as_object()) {
            for (k, val) in src {
                dst.insert(k.clone(), val.clone());
            }
        }
        v
    }
}

/// Bytes of weights held: each linear's stored bytes (NF4 codes + absmax, or its floats), the
/// other parameters (embeddings, norms, biases outside linears) in the compute dtype.
pub fn weight_bytes<B: LlmBackend, M: CausalLm<B>>(model: &M) -> u64 {
    let elem = dtype_bytes::<B>();
    let linears = model.linears();
    let linear_params: usize = linears.iter().map(|(_, l)| l.num_params()).sum();
    let linear_bytes: usize = linears
        .iter()
        .map(|(_, l)| match l.nf4_bytes() {
            // The bias of an NF4 linear is a float tensor next to the packed weight.
            Some(w) => {
                let packed = (l.in_features() * l.out_features()).div_ceil(2);
                w + (l.num_params() - packed) * elem
            }
            None => l.num_params() * elem,
        })
        .sum();
    (linear_bytes + (model.num_params() - linear_params) * elem) as u64
}

/// Bytes per element of the backend's compute dtype.
fn dtype_bytes<B: LlmBackend>() -> usize {
    match B::DTYPE {
        "f32" => 4,
        _ => 2,
    }
}
