//! The backends models run on, and the one place where they differ: how a linear layer is
//! computed. Model code is generic over [`LlmBackend`] (a Burn backend plus these two
//! constructors), so architectures never mention a device.

use burn_ndarray::NdArray;
use burn_tensor::backend::Backend;
use burn_tensor::Tensor;

use crate::host_linear::HostLinear;
use crate::linear::Linear;
use crate::nf4::Nf4Weight;

pub trait LlmBackend: Backend {
    /// Name of the compute dtype, for model info ("f32", "bf16").
    const DTYPE: &'static str;
    /// Whether kernels are compiled and autotuned on first use (CubeCL: NVRTC + autotune), so
    /// a load should run the shapes serving will launch before it reports the model ready.
    const JIT: bool = false;
    /// A float linear layer from a loaded weight `[out, in]`.
    fn dense_linear(
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Box<dyn Linear<Self>>;
    /// An NF4 linear layer (bnb Linear4bit: float bias).
    fn nf4_linear(
        weight: Nf4Weight,
        bias: Option<Tensor<Self, 1>>,
        device: &Self::Device,
    ) -> Box<dyn Linear<Self>>;
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
