//! The backends models run on, and the places where they differ: how a linear layer is
//! computed, and the few per-layer steps a backend may fuse into one kernel (RMSNorm and the
//! residual add before it, rotary embedding, the KV-cache append, decode attention, gated
//! activation, and several projections of one input in one launch; Burn ops by default, so
//! the CPU runs exactly what HF's modeling code does). Model code is generic over
//! [`LlmBackend`], so architectures never mention a device.

use burn_ndarray::NdArray;
use burn_tensor::backend::Backend;
use burn_tensor::{DType, Int, Tensor, TensorData};

use crate::attention::{AttentionConfig, LayerKv, PoolLayer};
use crate::config::Activation;
use crate::host_linear::HostLinear;
use crate::linear::Linear;
use crate::nf4::Nf4Weight;
use crate::norm::RmsNorm;
use crate::rope::RopeTables;

pub trait LlmBackend: Backend {
    /// Name of the compute dtype, for model info ("f32", "bf16").
    const DTYPE: &'static str;
    /// Whether kernels are compiled and autotuned on first use (CubeCL: NVRTC + autotune), so
    /// a load should run the shapes serving will launch before it reports the model ready.
    const JIT: bool = false;
    /// Decode batch sizes `1..=N` a JIT backend's load of an NF4 model warms up (CUDA: every
    /// row count the NF4 GEMV serves, each compiled on its own). Float models warm `1..=4`
    /// only: their linears are Burn matmuls, autotuned per row count (seconds per shape).
    const WARM_UP_NF4_DECODE_ROWS: usize = 4;
    /// Prompt chunk lengths a JIT backend's load of an NF4 model warms up beside the 32-token
    /// one every load runs (CUDA: one per token-tile count of the tensor-core NF4 kernel, each
    /// compiled on its own, then the row counts its prefill matmuls are autotuned by).
    const WARM_UP_NF4_PROMPT_ROWS: &'static [usize] = &[];
    /// A float linear layer from a loaded weight `[out, in]`.
    fn dense_linear(
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Box<dyn Linear<Self>>;
    /// An NF4 linear layer (bnb Linear4bit: float bias). A backend may still be copying the
    /// weight to the device when this returns: nothing reads it before
    /// [`LlmBackend::finish_uploads`].
    fn nf4_linear(
        weight: Nf4Weight,
        bias: Option<Tensor<Self, 1>>,
        device: &Self::Device,
    ) -> Box<dyn Linear<Self>>;
    /// Wait until every copy [`LlmBackend::nf4_linear`] queued for `device` on the calling
    /// thread (one load) has ended (every load calls it before the model runs, also when the
    /// load failed, before its buffers are freed); the reason if one failed. The default:
    /// nothing is ever queued.
    fn finish_uploads(_device: &Self::Device) -> crate::error::Result<()> {
        Ok(())
    }
    /// A float tensor from its stored little-endian bytes (`dtype` F32, F16 or BF16, as the
    /// checkpoint holds it), on `device`; Burn converts it to the backend's float type.
    fn float_from_bytes<const D: usize>(
        bytes: &[u8],
        dtype: DType,
        shape: [usize; D],
        device: &Self::Device,
    ) -> Tensor<Self, D> {
        host_float_tensor(bytes, dtype, shape, device)
    }
    /// Free what the backend holds for `device` outside its memory pool (CUDA: the cuBLAS
    /// handle, its stream and workspace), when a model leaves the device. Made again on next use.
    fn release_device(_device: &Self::Device) {}
    /// Bytes the device memory pool has reserved from the driver, for backends with one.
    fn pool_reserved_bytes(_device: &Self::Device) -> Option<u64> {
        None
    }
    /// The device stream the calling thread's work goes to. CubeCL keeps one memory pool per
    /// stream and picks the stream from the calling thread, so a model pins every call to the
    /// stream it was loaded on ([`LlmBackend::on_stream`]): its weights, KV cache and workspace
    /// then live in that stream's pools, which unload can empty. Without a device pool: 0.
    fn current_stream() -> u64 {
        0
    }
    /// Run `f` with `stream` as the calling thread's device stream.
    fn on_stream<T>(_stream: u64, f: impl FnOnce() -> T) -> T {
        f()
    }
    /// `norm` applied to each row of `x` `[rows, hidden]` (HF `LlamaRMSNorm.forward`, or
    /// `Gemma2RMSNorm.forward` with `unit_offset`). Burn ops (seven kernels on a GPU) unless a
    /// backend fuses it.
    fn rms_norm(x: Tensor<Self, 2>, norm: &RmsNorm<Self>) -> Tensor<Self, 2> {
        crate::norm::rms_norm_ops(x, &norm.weight, norm.eps, norm.unit_offset)
    }
    /// The residual add and the next RMSNorm in one step: `(x + delta, rms_norm(x + delta))`,
    /// the sum rounded to the compute dtype first as HF's `residual + hidden_states` is.
    /// All `[rows, hidden]`.
    fn add_rms_norm(
        x: Tensor<Self, 2>,
        delta: Tensor<Self, 2>,
        norm: &RmsNorm<Self>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        let sum = x + delta;
        (sum.clone(), Self::rms_norm(sum, norm))
    }
    /// Rotary embedding of `x` `[rows, heads * head_dim]` (a projection's output), row `r` at
    /// the position of `tables` row `r` -> `[heads, rows, head_dim]` (HF
    /// `apply_rotary_pos_emb`, rotate-half layout).
    fn rope(x: Tensor<Self, 2>, heads: usize, tables: &RopeTables<Self>) -> Tensor<Self, 3> {
        let [rows, width] = x.dims();
        tables.apply(x.reshape([rows, heads, width / heads]).swap_dims(0, 1))
    }
    /// Append one sequence's chunk to its cache of one layer: `k`, `v` `[rows, kv_heads * d]`
    /// (the projections' outputs; rope not yet applied to `k`), rows at positions
    /// `past.len..`, rope `tables` `[rows, d]`. The default ropes `k` and concatenates: a new
    /// cache tensor every step (four copies on a GPU); a backend may write in place.
    fn kv_append(
        past: Option<LayerKv<Self>>,
        k: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        kv_heads: usize,
        tables: &RopeTables<Self>,
    ) -> LayerKv<Self> {
        crate::attention::kv_append_ops(past, k, v, kv_heads, tables)
    }
    /// Attention of a single new token over its sequence's whole cache (decode), in one
    /// kernel: `q` `[heads, 1, d]` (rope applied), `kv` the layer's cache with this token's
    /// entry last -> `[1, heads * d]`. `None` (the default, and for shapes a backend's kernel
    /// does not cover): the caller runs Burn's attention (GQA repeat, mask, softmax, two
    /// matmuls).
    fn decode_attention(
        _q: &Tensor<Self, 3>,
        _kv: &LayerKv<Self>,
        _cfg: &AttentionConfig,
    ) -> Option<Tensor<Self, 2>> {
        None
    }
    /// Whether models keep every sequence's KV cache as a slot of one pool per layer, planned
    /// at load ([`crate::attention::KvPool`]), so that [`LlmBackend::kv_append_rows`] and
    /// [`LlmBackend::decode_attention_rows`] serve a whole batch in one launch each instead of
    /// a few per sequence. Without (the CPU, where a launch costs nothing) each sequence's
    /// cache grows on its own.
    const KV_POOL: bool = false;
    /// An uninitialised `shape` tensor for a KV pool.
    fn kv_pool_tensor(shape: [usize; 4], device: &Self::Device) -> Tensor<Self, 4> {
        Tensor::zeros(shape, device)
    }
    /// Append every row of a batch to `pool`: row `r` (rope applied to its `k`) at slot
    /// `rows[2r]`, position `rows[2r + 1]`. `k`, `v` `[rows, kv_heads * d]` (the projections'
    /// outputs), `tables` `[rows, d]`. `false` (the default): nothing done, the caller appends
    /// sequence by sequence.
    fn kv_append_rows(
        _k: &Tensor<Self, 2>,
        _v: &Tensor<Self, 2>,
        _kv_heads: usize,
        _tables: &RopeTables<Self>,
        _pool: &PoolLayer<Self>,
        _rows: &Tensor<Self, 1, Int>,
    ) -> bool {
        false
    }
    /// [`LlmBackend::decode_attention`] for every row of a step in one launch: row `r` of `q`
    /// `[heads, rows, d]` (rope applied) over positions `0..=rows[2r + 1]` of slot `rows[2r]`
    /// of `pool` (this step's entries appended, so a prompt chunk's rows are causal) ->
    /// `[rows, heads * d]`, the sliding window and softcap applied. `None` (the
    /// default, and for shapes a backend's kernel does not cover): per sequence.
    fn decode_attention_rows(
        _q: &Tensor<Self, 3>,
        _pool: &PoolLayer<Self>,
        _rows: &Tensor<Self, 1, Int>,
        _cfg: &AttentionConfig,
    ) -> Option<Tensor<Self, 2>> {
        None
    }
    /// Attention of one sequence's prompt chunk over its pool slot by whole-matrix products
    /// (scores, masked softmax, values), for chunks long enough that these beat
    /// [`LlmBackend::decode_attention_rows`]: `q` `[heads, len, d]` (rope applied) at positions
    /// `start..start + len` of slot `slot` of `pool` (this chunk's entries appended) ->
    /// `[len, heads * d]`, the sliding window and softcap applied. `None` (the default, and for
    /// chunks a backend leaves to its other paths): the caller's row kernel or Burn's attention.
    fn chunk_attention(
        _q: &Tensor<Self, 3>,
        _pool: &PoolLayer<Self>,
        _slot: usize,
        _start: usize,
        _cfg: &AttentionConfig,
    ) -> Option<Tensor<Self, 2>> {
        None
    }
    /// `x` through each of `linears` (q/k/v: the same input, no bias) in one step, outputs in
    /// order. `None` (the default, and where a backend cannot): the caller runs each.
    fn linears_stacked(
        _x: &Tensor<Self, 2>,
        _linears: &[&dyn Linear<Self>],
    ) -> Option<Vec<Tensor<Self, 2>>> {
        None
    }
    /// `act(gate(x)) * up(x)` in one step (HF `LlamaMLP`'s first half). `None` (the default,
    /// and where a backend cannot): the caller runs the projections and
    /// [`LlmBackend::gated_act`].
    fn gated_linears(
        _x: &Tensor<Self, 2>,
        _gate: &dyn Linear<Self>,
        _up: &dyn Linear<Self>,
        _act: Activation,
    ) -> Option<Tensor<Self, 2>> {
        None
    }
    /// `act(gate) * up` (HF `act_fn(gate_proj(x)) * up_proj(x)`), both `[rows, intermediate]`.
    fn gated_act(gate: Tensor<Self, 2>, up: Tensor<Self, 2>, act: Activation) -> Tensor<Self, 2> {
        crate::mlp::gated_act_ops(gate, up, act)
    }
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

/// The CPU: f32 on ndarray, linears as host GEMVs ([`HostLinear`]).
impl LlmBackend for NdArray<f32> {
    const DTYPE: &'static str = "f32";
    fn dense_linear(
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Box<dyn Linear<Self>> {
        let [out, inp] = weight.dims();
        let device = weight.device();
        Box::new(HostLinear::new(
            host(weight),
            bias.map(host),
            out,
            inp,
            device,
        ))
    }
    fn nf4_linear(
        weight: Nf4Weight,
        bias: Option<Tensor<Self, 1>>,
        device: &Self::Device,
    ) -> Box<dyn Linear<Self>> {
        Box::new(HostLinear::nf4(weight, bias.map(host), *device))
    }
}

/// [`LlmBackend::float_from_bytes`] through Burn: the bytes copied into an owned `TensorData`,
/// uploaded and converted by the backend.
pub(crate) fn host_float_tensor<B: Backend, const D: usize>(
    bytes: &[u8],
    dtype: DType,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(
        TensorData::from_bytes_vec(bytes.to_vec(), shape.to_vec(), dtype),
        device,
    )
}
