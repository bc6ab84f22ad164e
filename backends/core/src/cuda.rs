//! The CUDA backend: Burn's CubeCL backend on CUDA with bf16 compute, and the NF4 linear layer
//! as CubeCL kernels.
//!
//! NF4 forward (bnb `matmul_4bit` semantics, f32 accumulation):
//! - up to [`GEMV_MAX_TOKENS`] token rows (decode): [`nf4_gemv`] dequantizes and multiplies in
//!   one pass, reading each packed weight byte once: one plane (warp) per output feature, each
//!   lane walking the row in 16-byte vectors (32 weights), the NF4 code book in shared memory,
//!   the per-token partial sums reduced with `plane_sum`.
//! - more rows (prefill): [`nf4_dequantize`] to a bf16 `[out, in]` matrix, then Burn's
//!   (tensor-core) matmul, the way bnb dequantizes then calls `torch.matmul`.
//!
//! Weights live on the device as: packed codes (`out*in/2` bytes, as bnb stores them), one f32
//! absmax per 64 weights (the double-quantized absmax is expanded at load), the 16-entry code book.

use burn_cubecl::cubecl::cuda::{CudaDevice, CudaRuntime};
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim, Runtime};
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_tensor::{DType, Shape, Tensor, TensorPrimitive};

use crate::backend::LlmBackend;
use crate::linear::{DenseLinear, Linear};
use crate::nf4::{Nf4Weight, BLOCKSIZE};

/// Burn's CUDA backend without fusion (custom kernels take its tensors directly), bf16 floats.
pub type CudaBf16 = CubeBackend<CudaRuntime, half::bf16, i32, u8>;

/// Parse "cuda" / "cuda:N".
pub fn parse_device(spec: &str) -> Option<CudaDevice> {
    match spec {
        "cuda" => Some(CudaDevice::new(0)),
        _ => spec
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(CudaDevice::new),
    }
}

/// Most token rows the fused GEMV handles; more use dequantize + matmul.
pub const GEMV_MAX_TOKENS: usize = 16;
/// Token rows up to which [`CudaNf4Linear::forward`] uses the fused GEMV (measured crossover).
pub static GEMV_TOKENS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(4);
/// Output features (planes) per cube in the GEMV.
const ROWS_PER_CUBE: u32 = 8;

pub use kernels::{nf4_dequantize, nf4_gemv};

/// The CubeCL kernels (their `Tensor` is CubeCL's, not Burn's).
mod kernels {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    /// `out[t, row] = sum_k x[t, k] * code[q(row, k)] * absmax[(row * k_dim + k) / 64]`.
    ///
    /// One plane (warp) per output row. Each lane takes one 16-byte vector of packed codes per
    /// step (4 words, 32 weights: half an absmax block, so one absmax per step), and the matching
    /// 8-wide vectors of `x` (16-byte loads, L1-resident: `x` is at most 16 x 28 KiB). A plane
    /// thus reads 512 contiguous bytes of the weight per step, each byte once. The code book sits
    /// in shared memory: 16 f32 in 16 distinct banks, so the lookups never conflict. Sums of
    /// `x * code` are scaled by absmax once per step, then reduced across the plane.
    ///
    /// Shapes: `x` `[tokens, k / 8]` of `Vector<F, 8>`, `packed` `[n * k / 32]` of
    /// `Vector<u32, 4>`, `absmax` `[n * k / 64]`, `out` `[tokens, n]`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn nf4_gemv<F: Float, NX: Size, NQ: Size>(
        x: &Tensor<Vector<F, NX>>,
        packed: &Tensor<Vector<u32, NQ>>,
        absmax: &Tensor<f32>,
        code: &Tensor<f32>,
        out: &mut Tensor<F>,
        n: u32,
        k: u32,
        #[comptime] tokens: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let mut lut = SharedMemory::<f32>::new(16usize);
        if UNIT_POS < 16 {
            lut[UNIT_POS as usize] = code[UNIT_POS as usize];
        }
        sync_cube();

        let row = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        let n_us = n as usize;
        // A whole plane shares `row`, so the plane_sum below is reached by all its lanes or none.
        if row < n_us {
            // 32-weight steps per row, 8-wide x vectors per token row.
            let steps = k as usize / 32;
            let xrow = k as usize / 8;
            let mut acc = Array::<f32>::new(tokens);
            #[unroll]
            for t in 0..tokens {
                acc[t] = f32::new(0.0);
            }
            let base = row * steps;
            let mut s = UNIT_POS_X as usize;
            while s < steps {
                let q = packed[base + s];
                let a = absmax[(base + s) / 2];
                let mut part = Array::<f32>::new(tokens);
                #[unroll]
                for t in 0..tokens {
                    part[t] = f32::new(0.0);
                }
                #[unroll]
                for j in 0..4usize {
                    // Byte b of the little-endian word holds weights 2b (high nibble), 2b+1.
                    let word = q[j];
                    let c0 = lut[((word >> 4) & 0xF) as usize];
                    let c1 = lut[(word & 0xF) as usize];
                    let c2 = lut[((word >> 12) & 0xF) as usize];
                    let c3 = lut[((word >> 8) & 0xF) as usize];
                    let c4 = lut[((word >> 20) & 0xF) as usize];
                    let c5 = lut[((word >> 16) & 0xF) as usize];
                    let c6 = lut[((word >> 28) & 0xF) as usize];
                    let c7 = lut[((word >> 24) & 0xF) as usize];
                    #[unroll]
                    for t in 0..tokens {
                        let xv = x[t * xrow + s * 4 + j];
                        part[t] += f32::cast_from(xv[0]) * c0
                            + f32::cast_from(xv[1]) * c1
                            + f32::cast_from(xv[2]) * c2
                            + f32::cast_from(xv[3]) * c3
                            + f32::cast_from(xv[4]) * c4
                            + f32::cast_from(xv[5]) * c5
                            + f32::cast_from(xv[6]) * c6
                            + f32::cast_from(xv[7]) * c7;
                    }
                }
                #[unroll]
                for t in 0..tokens {
                    acc[t] += part[t] * a;
                }
                s += CUBE_DIM_X as usize;
            }
            #[unroll]
            for t in 0..tokens {
                let total = plane_sum(acc[t]);
                if UNIT_POS_X == 0 {
                    out[t * n_us + row] = F::cast_from(total);
                }
            }
        }
    }

    /// Dequantize to `out` (`[n, k]`, row-major), 8 weights (one word) per unit.
    #[cube(launch)]
    pub fn nf4_dequantize<F: Float>(
        packed: &Tensor<u32>,
        absmax: &Tensor<f32>,
        code: &Tensor<f32>,
        out: &mut Tensor<F>,
        words: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let w = ABSOLUTE_POS;
        if w < words as usize {
            let word = packed[w];
            let a = absmax[w / 8];
            let b = w * 8;
            out[b] = F::cast_from(code[((word >> 4) & 0xF) as usize] * a);
            out[b + 1] = F::cast_from(code[(word & 0xF) as usize] * a);
            out[b + 2] = F::cast_from(code[((word >> 12) & 0xF) as usize] * a);
            out[b + 3] = F::cast_from(code[((word >> 8) & 0xF) as usize] * a);
            out[b + 4] = F::cast_from(code[((word >> 20) & 0xF) as usize] * a);
            out[b + 5] = F::cast_from(code[((word >> 16) & 0xF) as usize] * a);
            out[b + 6] = F::cast_from(code[((word >> 28) & 0xF) as usize] * a);
            out[b + 7] = F::cast_from(code[((word >> 24) & 0xF) as usize] * a);
        }
    }
}

/// An NF4 weight on the GPU.
pub struct CudaNf4Linear {
    packed: CubeTensor<CudaRuntime>,
    absmax: CubeTensor<CudaRuntime>,
    code: CubeTensor<CudaRuntime>,
    bias: Option<Tensor<CudaBf16, 1>>,
    out_features: usize,
    in_features: usize,
    /// What the checkpoint stores for this weight (PyTorch parameter count, footprint).
    packed_len: usize,
    stored_bytes: usize,
}

fn upload(
    device: &CudaDevice,
    bytes: &[u8],
    shape: Vec<usize>,
    dtype: DType,
) -> CubeTensor<CudaRuntime> {
    let client = CudaRuntime::client(device);
    let handle: Handle = client.create_from_slice(bytes);
    CubeTensor::new_contiguous(client, device.clone(), Shape::from(shape), handle, dtype)
}

impl CudaNf4Linear {
    pub fn new(weight: Nf4Weight, bias: Option<Tensor<CudaBf16, 1>>, device: &CudaDevice) -> Self {
        // The GEMV walks 32-weight (4-word) steps that never straddle an absmax block.
        assert!(
            weight.in_features.is_multiple_of(BLOCKSIZE),
            "in_features must be a multiple of 64"
        );
        let n = weight.out_features * weight.in_features;
        let packed = upload(device, &weight.packed, vec![n / 8], DType::U32);
        let absmax: Vec<u8> = weight
            .absmax_f32()
            .iter()
            .flat_map(|a| a.to_le_bytes())
            .collect();
        let absmax = upload(device, &absmax, vec![n / BLOCKSIZE], DType::F32);
        let code: Vec<u8> = weight.code.iter().flat_map(|a| a.to_le_bytes()).collect();
        let code = upload(device, &code, vec![16], DType::F32);
        CudaNf4Linear {
            packed,
            absmax,
            code,
            bias,
            out_features: weight.out_features,
            in_features: weight.in_features,
            packed_len: weight.packed.len(),
            stored_bytes: weight.stored_bytes(),
        }
    }

    /// The fused GEMV into a caller-provided output `[tokens, out]` (tests poison it first).
    pub fn gemv_into(
        &self,
        x: CubeTensor<CudaRuntime>,
        out: CubeTensor<CudaRuntime>,
    ) -> CubeTensor<CudaRuntime> {
        let tokens = x.meta.shape()[0];
        assert!((1..=GEMV_MAX_TOKENS).contains(&tokens));
        let x = into_contiguous(x);
        let client = x.client.clone();
        let n = self.out_features as u32;
        let cubes = n.div_ceil(ROWS_PER_CUBE);
        let dtype = x.dtype;
        nf4_gemv::launch::<CudaRuntime>(
            &client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_2d(32, ROWS_PER_CUBE),
            8,
            4,
            x.into_tensor_arg(),
            self.packed.clone().into_tensor_arg(),
            self.absmax.clone().into_tensor_arg(),
            self.code.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            n,
            self.in_features as u32,
            tokens,
            dtype.into(),
        );
        out
    }

    /// The weight dequantized to a bf16 `[out, in]` tensor.
    pub fn dequantize(&self) -> Tensor<CudaBf16, 2> {
        let client = self.packed.client.clone();
        let shape = Shape::from(vec![self.out_features, self.in_features]);
        let out = empty_device_dtype(
            client.clone(),
            self.packed.device.clone(),
            shape,
            DType::BF16,
        );
        let words = (self.out_features * self.in_features / 8) as u32;
        let cube_dim = CubeDim::new_1d(256);
        nf4_dequantize::launch::<CudaRuntime>(
            &client,
            CubeCount::Static(words.div_ceil(256), 1, 1),
            cube_dim,
            self.packed.clone().into_tensor_arg(),
            self.absmax.clone().into_tensor_arg(),
            self.code.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            words,
            DType::BF16.into(),
        );
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

impl CudaNf4Linear {
    /// `x W^T` through the fused GEMV (`tokens <= GEMV_MAX_TOKENS`).
    pub fn forward_gemv(&self, x: Tensor<CudaBf16, 2>) -> Tensor<CudaBf16, 2> {
        let [tokens, _] = x.dims();
        let x = x.into_primitive().tensor();
        let out = empty_device_dtype(
            x.client.clone(),
            x.device.clone(),
            Shape::from(vec![tokens, self.out_features]),
            x.dtype,
        );
        Tensor::from_primitive(TensorPrimitive::Float(self.gemv_into(x, out)))
    }

    /// `x W^T` by dequantizing to bf16 and a dense matmul.
    pub fn forward_dequant(&self, x: Tensor<CudaBf16, 2>) -> Tensor<CudaBf16, 2> {
        x.matmul(self.dequantize().transpose())
    }
}

impl Linear<CudaBf16> for CudaNf4Linear {
    fn forward(&self, x: Tensor<CudaBf16, 2>) -> Tensor<CudaBf16, 2> {
        let [tokens, k] = x.dims();
        assert_eq!(k, self.in_features, "linear input width");
        let y = if tokens <= GEMV_TOKENS.load(std::sync::atomic::Ordering::Relaxed) {
            self.forward_gemv(x)
        } else {
            self.forward_dequant(x)
        };
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze_dim(0),
            None => y,
        }
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn num_params(&self) -> usize {
        self.packed_len + self.bias.as_ref().map_or(0, |b| b.dims()[0])
    }
    fn nf4_bytes(&self) -> Option<usize> {
        Some(self.stored_bytes)
    }
}

impl LlmBackend for CudaBf16 {
    const DTYPE: &'static str = "bf16";
    fn dense_linear(
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Box<dyn Linear<Self>> {
        Box::new(DenseLinear::new(weight, bias))
    }
    fn nf4_linear(
        weight: Nf4Weight,
        bias: Option<Tensor<Self, 1>>,
        device: &Self::Device,
    ) -> Box<dyn Linear<Self>> {
        Box::new(CudaNf4Linear::new(weight, bias, device))
    }
}
