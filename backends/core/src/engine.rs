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
    /// Run each chunk's tokens at positions `cache.len..` of its sequence and append them to
    /// its cache, all sequences in one pass (continuous batching: linears see every row).
    /// Returns logits for every row when `all_logits`, else `[batch.len(), vocab]`: each
    /// chunk's last token.
    fn forward_batch(&self, batch: &mut [SeqChunk<'_, B>], all_logits: bool) -> Tensor<B, 2>;
    /// One sequence: logits `[tokens, vocab]` when `all_logits`, else `[1, vocab]`.
    fn forward(&self, tokens: &[u32], cache: &mut KvCache<B>, all_logits: bool) -> Tensor<B, 2> {
        self.forward_batch(&mut [SeqChunk { tokens, cache }], all_logits)
    }
    fn num_layers(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Positions one sequence may hold (config `max_position_embeddings`, capped by the load).
    fn max_context(&self) -> usize;
    /// Parameter count as PyTorch's `sum(p.numel())` reports it.
    fn num_params(&self) -> usize;
    fn device(&self) -> B::Device;
    /// Elements of the model's KV-cache pool, if it has one ([`crate::attention::KvPool`]).
    fn kv_pool_numel(&self) -> Option<usize> {
        None
    }
    /// Every linear layer with its checkpoint module name (`model.layers.0.self_attn.q_proj`).
    fn linears(&self) -> Vec<(String, &dyn crate::Linear<B>)>;
}

/// One sequence's new tokens in a batched forward, with its cache.
pub struct SeqChunk<'a, B: LlmBackend> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache<B>,
}

impl<'a, B: LlmBackend> SeqChunk<'a, B> {
    /// A batch: each sequence's tokens paired with its cache, in order.
    pub fn zip(
        tokens: impl IntoIterator<Item = &'a [u32]>,
        caches: impl IntoIterator<Item = &'a mut KvCache<B>>,
    ) -> Vec<Self> {
        tokens
            .into_iter()
            .zip(caches)
            .map(|(tokens, cache)| SeqChunk { tokens, cache })
            .collect()
    }
}

/// Give the driver back what the device pool holds unused. Burn/CubeCL keep freed buffers
/// pooled: the first sync retires the dropped ones, the cleanup frees the empty pages, the
/// second sync lets the driver's stream-ordered frees complete.
pub(crate) fn hand_back_pool<B: LlmBackend>(device: &B::Device) {
    let _ = B::sync(device);
    B::memory_cleanup(device);
    let _ = B::sync(device);
}

/// What a step reads back for sampling.
enum Read {
    /// No sequence samples this step (prompt chunks before their last).
    Nothing,
    /// Every sampling sequence is plain greedy: its argmax, taken on the device.
    Ids(Vec<u32>),
    /// `[inputs, vocab]` logits for the host's sampler.
    Logits(Vec<f32>),
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
    /// The device stream the model was loaded on; every later call runs on it
    /// ([`LlmBackend::current_stream`]), whichever thread makes it.
    stream: u64,
}

impl<B: LlmBackend, M: CausalLm<B>> Engine<B, M> {
    /// `info`: architecture-specific metadata merged into [`DynEngine::info`].
    pub fn new(model: M, info: serde_json::Value) -> Self {
        Engine {
            model,
            seqs: HashMap::new(),
            info,
            stream: B::current_stream(),
        }
    }

    fn info_on_stream(&self) -> serde_json::Value {
        let elem = dtype_bytes::<B>();
        // The pool (reserved at load) plus the caches outside it.
        let kv_bytes: usize = self.model.kv_pool_numel().unwrap_or(0) * elem
            + self
                .seqs
                .values()
                .filter(|s| s.cache.slot.is_none())
                .flat_map(|s| s.cache.layers.iter().flatten())
                .map(|l| {
                    (l.k.dims().iter().product::<usize>() + l.v.dims().iter().product::<usize>())
                        * elem
                })
                .sum::<usize>();
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

    /// Check every input before anything runs, so a bad one leaves every cache as it was.
    fn check(&self, inputs: &[StepInput<'_>]) -> Result<()> {
        let vocab = self.model.vocab_size();
        let mut ids = std::collections::HashSet::new();
        for input in inputs {
            if !ids.insert(input.seq_id) {
                return Err(CoreError::invalid(format!(
                    "sequence {} appears twice in one step",
                    input.seq_id
                )));
            }
            if input.tokens.is_empty() {
                return Err(CoreError::invalid(
                    "a step needs at least one token per sequence",
                ));
            }
            if let Some(&bad) = input.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(CoreError::invalid(format!(
                    "token id {bad} is out of range: the vocabulary has {vocab} entries"
                )));
            }
            let held = self.seqs.get(&input.seq_id).map_or(0, |s| s.cache.len);
            if held + input.tokens.len() > self.model.max_context() {
                return Err(CoreError::exhausted(format!(
                    "sequence would hold {} positions, over the context of {}",
                    held + input.tokens.len(),
                    self.model.max_context()
                )));
            }
        }
        Ok(())
    }

    /// One forward over every input's tokens, then sampling for those that ask.
    fn step_batch(&mut self, inputs: &[StepInput<'_>], outputs: &mut [SeqOutput]) -> Result<()> {
        self.check(inputs)?;
        if inputs.is_empty() {
            return Ok(());
        }
        let layers = self.model.num_layers();
        let mut seqs: Vec<Seq<B>> = inputs
            .iter()
            .map(|i| {
                self.seqs.remove(&i.seq_id).unwrap_or_else(|| Seq {
                    cache: KvCache::new(layers),
                    history: Vec::new(),
                    rng: None,
                })
            })
            .collect();
        let logits = self.model.forward_batch(
            &mut SeqChunk::zip(
                inputs.iter().map(|i| i.tokens),
                seqs.iter_mut().map(|s| &mut s.cache),
            ),
            false,
        );
        // Greedy rows without a repetition penalty or logprobs need only their argmax: taken on
        // the device, one id per row comes back instead of the `[inputs, vocab]` logits (16 rows
        // of a 128K vocabulary are 4 MB to read, convert and scan on the host each decode step).
        // Burn's argmax keeps the first maximum on every backend, as `sample`'s does (and
        // torch.argmax), so the ids are the same.
        let argmax_only = inputs.iter().filter(|i| i.sample).all(|i| {
            i.params.temperature == 0.0
                && i.params.repetition_penalty == 1.0
                && i.params.logprobs == 0
        });
        let vocab = self.model.vocab_size();
        let read = if !inputs.iter().any(|i| i.sample) {
            Ok(Read::Nothing)
        } else if argmax_only {
            let ids = logits
                .argmax(1)
                .into_data()
                .iter::<i64>()
                // A row with no finite maximum (all NaN or -inf) leaves Burn's reduce at its
                // start index (u32::MAX, or -1 in an i32): token 0, as the host's argmax gives.
                .map(|id| {
                    usize::try_from(id)
                        .ok()
                        .filter(|&t| t < vocab)
                        .map_or(0, |t| t as u32)
                })
                .collect::<Vec<u32>>();
            Ok(Read::Ids(ids))
        } else {
            // One read of every sequence's last-row logits: `[inputs, vocab]`.
            logits
                .into_data()
                .convert::<f32>()
                .into_vec()
                .map(Read::Logits)
                .map_err(|e| CoreError::internal(format!("reading logits: {e:?}")))
        };
        for (i, ((input, out), mut seq)) in
            inputs.iter().zip(outputs.iter_mut()).zip(seqs).enumerate()
        {
            seq.history.extend_from_slice(input.tokens);
            if input.sample {
                match &read {
                    Ok(Read::Ids(ids)) => {
                        *out = SeqOutput {
                            token: ids[i],
                            ..SeqOutput::default()
                        }
                    }
                    Ok(Read::Logits(logits)) => {
                        let mut row = logits[i * vocab..(i + 1) * vocab].to_vec();
                        let rng = seq.rng.get_or_insert_with(|| Rng::new(input.params.seed));
                        *out = sample(&mut row, &seq.history, &input.params, rng);
                    }
                    _ => {}
                }
            }
            self.seqs.insert(input.seq_id, seq);
        }
        read.map(|_| ())
    }
}

impl<B: LlmBackend, M: CausalLm<B>> DynEngine for Engine<B, M> {
    fn step(&mut self, inputs: &[StepInput<'_>], outputs: &mut [SeqOutput]) -> Result<()> {
        B::on_stream(self.stream, || self.step_batch(inputs, outputs))
    }

    fn release(&mut self, seq_id: u64) {
        B::on_stream(self.stream, || self.seqs.remove(&seq_id));
    }

    fn destroy(self: Box<Self>) {
        let device = self.model.device();
        B::on_stream(self.stream, || {
            drop(self);
            // Without this an unloaded model's memory stays reserved until the process exits.
            B::release_device(&device);
            hand_back_pool::<B>(&device);
        });
    }

    fn info(&self) -> serde_json::Value {
        B::on_stream(self.stream, || self.info_on_stream())
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
