//! The CUDA backend: Burn's CubeCL backend on CUDA with bf16 compute, and the NF4 linear layer
//! as CubeCL kernels.
//!
//! NF4 forward (bnb `matmul_4bit` semantics, f32 accumulation):
//! - up to [`GEMV_MAX_TOKENS`] token rows (decode): [`nf4_gemv`] dequantizes and multiplies in
//!   one pass, reading each packed weight byte once: a cube per few output rows, their `k`
//!   range split over its units in 16-byte vectors (32 weights), the NF4 code book in shared
//!   memory, partial sums reduced over planes and then the cube. From 3 rows (k a multiple
//!   of 128) [`nf4_mma`] instead: the dequantized weights fed to tensor-core MMAs, up to
//!   [`MMA_MAX_TOKENS`] rows in tiles of 16 (short prompts, steps mixing a prompt with decodes).
//! - more rows (prefill): [`nf4_dequantize`] to a bf16 `[out, in]` matrix, then cuBLAS or Burn's
//!   (tensor-core) matmul, the way bnb dequantizes then calls `torch.matmul`.
//!
//! Weights live on the device as: packed codes (bnb's `out*in/2` bytes in tiles of 16 rows x 128
//! weights, rows padded to 16: [`crate::nf4::tile_codes`], so a tensor-core fragment's loads are
//! contiguous), one f32 absmax per 64 weights in the same tiles ([`crate::nf4::tile_absmax`]:
//! a code word `w`'s at `w / 8`; the double-quantized absmax is expanded at load), the 16-entry
//! code book.

use burn_cubecl::cubecl::cuda::{CudaDevice, CudaRuntime};
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim, Runtime};
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_tensor::{DType, Int, Shape, Tensor, TensorPrimitive};

use crate::attention::{AttentionConfig, LayerKv, PoolLayer};
use crate::backend::LlmBackend;
use crate::config::Activation;
use crate::driver::UploadBytes;
use crate::linear::{DenseLinear, Linear};
use crate::nf4::{Absmax, Nf4Weight, BLOCKSIZE};
use crate::norm::RmsNorm;
use crate::rope::RopeTables;

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

/// Most token rows the SIMT GEMV ([`nf4_gemv`]) handles; [`nf4_mma`] takes up to
/// [`MMA_MAX_TOKENS`], more use dequantize + matmul.
pub const GEMV_MAX_TOKENS: usize = 16;
/// Token rows up to which [`CudaNf4Linear::forward`] uses the fused GEMV; more go to
/// [`nf4_mma`]'s token tiles up to [`MMA_TOKENS`] ([`fused_config`]), past that dequantize and
/// multiply. On an H200 (docs/benchmarks.md, run 14, 8B shapes) the GEMV took 29-89 us
/// at 8 rows against 104-170 us for dequantize + cuBLAS (wall, host waits included), and
/// 51-170 us against 98-161 us at 16 rows; the GEMV needs no host wait, so it keeps the lead.
pub static GEMV_TOKENS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(GEMV_MAX_TOKENS);
/// Whether [`LlmBackend::linears_stacked`] / [`LlmBackend::gated_linears`] launch several NF4
/// projections together (the default); off, each projection is its own GEMV and the
/// activation its own kernel (`llm-bench tiny` compares the two).
pub static FUSED_PROJECTIONS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(true);
/// Most token rows [`nf4_mma`] takes in one launch: 4 tiles of 16 (the MMA's m), the weight
/// fragments each lane dequantizes used by every tile.
pub const MMA_MAX_TOKENS: usize = 64;
/// Row counts past [`GEMV_TOKENS`] up to which NF4 layers run [`nf4_mma`]'s token tiles instead
/// of dequantize + matmul (short prompts, and the steps that mix a newcomer's prompt chunk with
/// the others' decode rows). Weights are read and dequantized once either way; the tiles skip
/// writing and re-reading the bf16 copy (run 15: dequantize + cuBLAS 113-123 µs on the 8B's
/// 14336-wide shapes at 8-64 rows, against `nf4_mma`'s 51-54 µs for one tile of 16).
/// `LLM_CUDA_MMA_ROWS=N` ([`read_env`]) lowers it, 16 turns the tiles off.
pub static MMA_TOKENS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(MMA_MAX_TOKENS);
/// Whether prefill (rows past the fused kernels, [`fused_config`]) dequantizes each NF4 weight
/// to its `[in, out]` transpose ([`nf4_dequantize_t`]) for the matmul, or to `[out, in]` and
/// multiplies by a transposed view. Set from `LLM_CUDA_DEQUANT` ([`read_env`]) at each CUDA
/// load, for `bench/gpu.sh` to compare the two on a whole prompt.
pub static DEQUANT_TRANSPOSED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(true);
/// Whether [`MMA_MIN_TOKENS`] to [`MMA_MAX_TOKENS`] token rows go to the tensor-core
/// [`nf4_mma`] (the default) rather than the SIMT [`nf4_gemv`] (up to 16 rows) or dequantize +
/// matmul; off by `LLM_CUDA_MMA=0` ([`read_env`]), and where the device has no bf16
/// `mma.m16n8k16` ([`probe_mma`]).
pub static MMA_DECODE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
/// Whether one token row goes to the hand-written tensor-core GEMV ([`crate::gemv_tc`], the
/// default where [`MMA_DECODE`] is on) rather than the SIMT [`nf4_gemv`]; off by
/// `LLM_CUDA_GEMV_TC=0` ([`read_env`]).
pub static TC_DECODE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
/// Fewest token rows [`nf4_mma`] takes. On an H200 (docs/benchmarks.md, run 15, 8B shapes) it
/// took 39-41 us at 2 rows against the SIMT GEMV's 32-33 us, and led from 4 rows on (41 vs
/// 52-57 us; 51-54 vs 144-168 us at 16).
pub const MMA_MIN_TOKENS: usize = 3;
/// Fewest rows of a sequence's prompt chunk that attend through cuBLAS
/// ([`LlmBackend::chunk_attention`]: scores, [`chunk_softmax`], values) rather than the row
/// kernel ([`decode_attention_rows`], which reads every key and value once per row and head,
/// and reduces every score over a plane). On an H200 (docs/benchmarks.md, run 21, wall per
/// call) the cuBLAS path costs 124-199 us whatever the size (its host round trips and
/// launches), the row kernel grows with rows x positions: 8B shape 154 us at 160 rows (cuBLAS
/// 124), 589 us at 512 (cuBLAS 133); Gemma-2 and Phi-3 shapes at 128-160 rows 61-69 us
/// (cuBLAS 132-199). So from 256 rows; between 160 and 512 not measured.
/// `LLM_CUDA_CHUNK_ATTENTION_ROWS=N` ([`read_env`]) moves it; a count past the prefill chunk
/// turns the path off.
pub static CHUNK_ATTENTION_ROWS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(256);
/// Most score elements (`heads x rows x positions`, f32, with a bf16 copy of the
/// probabilities: 6 bytes each) one [`LlmBackend::chunk_attention`] holds at once: 384 MiB,
/// the 8B's 512-row chunk at the end of a 4,096-position context; chunks later in longer
/// contexts go to the other paths.
const CHUNK_ATTENTION_MAX_SCORES: usize = 1 << 26;
/// Most planes (warps) per GEMV cube.
const MAX_PLANES: usize = 8;

pub use kernels::{
    add_rms_norm, chunk_softmax, decode_attention, decode_attention_rows, gated_act, kv_append,
    kv_append_rows, nf4_dequantize, nf4_dequantize_t, nf4_gemv, nf4_mma, rms_norm, rope,
    DEQUANT_UNITS, DEQUANT_WORDS,
};

/// KV-cache capacity grows in multiples of this many positions.
const KV_CHUNK: usize = 128;

/// The CubeCL kernels. Every buffer is a flat `Array` (launched as an `ArrayArg`): a CubeCL
/// `Tensor` argument carries its shape and strides to the device, which costs a buffer
/// allocation and a host-to-device copy on every launch; these kernels take their few sizes
/// as scalars instead.
mod kernels {
    use super::MAX_PLANES;
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::cmma;
    use burn_cubecl::cubecl::prelude::*;

    /// Weights 8j..8j+8 of a 16-byte vector of codes `q`, looked up in the code book. Byte b of
    /// each little-endian word holds weights 2b (high nibble) and 2b+1 (low nibble).
    #[cube]
    fn code_at<NQ4: Size>(
        q: Vector<u32, NQ4>,
        lut: &SharedMemory<f32>,
        #[comptime] i: usize,
    ) -> f32 {
        let word = q[comptime!(i / 8)];
        let shift = comptime!(nibble_shift(i));
        lut[((word >> shift) & 0xF) as usize]
    }

    /// Bit offset of weight `i % 8` in its little-endian word: weight 2b sits in the high
    /// nibble of byte b, weight 2b+1 in the low one.
    const fn nibble_shift(i: usize) -> u32 {
        let byte = (i % 8 / 2) as u32;
        if i.is_multiple_of(2) {
            byte * 8 + 4
        } else {
            byte * 8
        }
    }

    /// The 4-byte word of codes holding weights `8 j .. 8 j + 8` of `row` (`k` weights per row)
    /// in the tiled layout of [`crate::nf4::tile_codes`] (`tiled_byte / 4`): per 16 rows
    /// (`2 k` words), per window of 128 weights a tile of 256 words, 16 per row (the last
    /// window 8 per row when `k` is an odd multiple of 64).
    #[cube]
    fn code_word(row: usize, j: usize, k: usize) -> usize {
        let width = select(j / 16 < k / 128, 16usize, 8usize);
        (row / 16) * (k * 2) + (j / 16) * 256 + (row % 16) * width + j % 16
    }

    /// [`code_word`] for the 16-byte vector holding weights `32 s .. 32 s + 32` of `row` (every
    /// term of its word index is a multiple of 4).
    #[cube]
    fn code_vec(row: usize, s: usize, k: usize) -> usize {
        code_word(row, s * 4, k) / 4
    }

    /// `out[t, row] = sum_k x[t, k] * code[q(row, k)] * absmax[(row * k_dim + k) / 64]`, for
    /// up to three weights of the same input at once.
    ///
    /// A cube owns `rows` output rows and splits their `k` range over all its units (split-K):
    /// a unit takes one 16-byte vector of packed codes per row per step (32 weights, half an
    /// absmax block, so one absmax per step), and the matching `x` as 16-byte vectors of 8
    /// (L1-resident: `x` is at most 16 x 28 KiB). Consecutive units read consecutive vectors of
    /// a row, 64 contiguous bytes per window of 128 weights in the tiled layout ([`code_vec`]),
    /// and each weight byte is read once.
    /// The code book sits in shared memory, 16 f32 in 16 distinct banks: lookups never conflict.
    /// Each pass issues the loads of `unroll` steps before any math, so several loads per unit
    /// are in flight.
    ///
    /// Two loop orders, by instruction count per weight and token: with one token, `x` is
    /// converted once and reused over `rows` rows (lookup + FMA per weight); with more tokens,
    /// each row's codes are looked up once and reused over the tokens (FMA + convert per token).
    /// Partial sums are reduced over each plane, then over the cube's planes in shared memory.
    ///
    /// Several weights, one launch (decode runs a few hundred launches per token, and each
    /// costs host time): stacked (q, k, v; `gated` false): cubes of weight 0 first, then 1
    /// from cube `cut1`, then 2 from cube `cut2`, and `out` holds each weight's
    /// `[tokens, n_i]` one after the other, weight `i` from element `base_i` (`base_0` = 0). With `gated` (two weights of equal `n`: gate, up),
    /// every cube computes the same rows of both and writes `act(gate) * up` `[tokens, n0]`,
    /// rounded as [`gated_act`] rounds. Weights a launch does not use are bound to weight 0.
    ///
    /// Shapes: `x` `[tokens, k / 8]` of `Vector<F, 8>`, `packed_i` the tiled codes
    /// ([`code_vec`]; `n_i` rounded up to 16, times `k / 32`) of `Vector<u32, 4>`, `absmax_i`
    /// tiled alike ([`crate::nf4::tile_absmax`], `n_i` rounded up to 16, times `k / 64`). Cube dim `(32, planes)`, `planes <= MAX_PLANES`; cube count: the sum of `ceil(n_i / rows)` over the stacked
    /// weights (every one but the last a multiple of `rows`), `ceil(n0 / rows)` gated.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn nf4_gemv<F: Float, NX: Size, NQ4: Size>(
        x: &Array<Vector<F, NX>>,
        packed0: &Array<Vector<u32, NQ4>>,
        absmax0: &Array<f32>,
        packed1: &Array<Vector<u32, NQ4>>,
        absmax1: &Array<f32>,
        packed2: &Array<Vector<u32, NQ4>>,
        absmax2: &Array<f32>,
        code: &Array<f32>,
        out: &mut Array<F>,
        n0: u32,
        n1: u32,
        n2: u32,
        cut1: u32,
        cut2: u32,
        base1: u32,
        base2: u32,
        k: u32,
        #[comptime] tokens: usize,
        #[comptime] rows: usize,
        #[comptime] unroll: usize,
        #[comptime] gated: bool,
        #[comptime] gelu: bool,
        #[define(F)] _dtype: StorageType,
    ) {
        // Weights per row: 2 gated (gate and up of the same row), else 1.
        let lanes = comptime!(if gated { 2usize } else { 1usize });
        let width = comptime!(rows * lanes * tokens);
        let mut lut = SharedMemory::<f32>::new(16usize);
        let mut partial = SharedMemory::<f32>::new(comptime!(MAX_PLANES * rows * lanes * tokens));
        if UNIT_POS < 16 {
            lut[UNIT_POS as usize] = code[UNIT_POS as usize];
        }
        sync_cube();

        // The weight this cube's rows belong to: stacked weight 1 from cube `cut1`, 2 from
        // `cut2` (both past the last cube when not stacked).
        let cube = CUBE_POS_X as usize;
        let in1 = CUBE_POS_X >= cut1;
        let in2 = CUBE_POS_X >= cut2;
        let n_us = select(in2, n2, select(in1, n1, n0)) as usize;
        let first_cube = select(in2, cut2, select(in1, cut1, u32::new(0))) as usize;
        let out_base = select(in2, base2, select(in1, base1, u32::new(0))) as usize;
        let row0 = (cube - first_cube) * rows;
        let steps = k as usize / 32;
        let xrow = k as usize / 8;
        let mut acc = Array::<f32>::new(width);
        #[unroll]
        for i in 0..width {
            acc[i] = f32::new(0.0);
        }
        // Steps past the end (last pass) read the last step again with an absmax of 0: they
        // add nothing.
        let stride = CUBE_DIM as usize;
        let mut s = UNIT_POS as usize;
        while s < steps {
            let mut q = Array::<Vector<u32, NQ4>>::new(comptime!(rows * unroll * lanes));
            let mut a = Array::<f32>::new(comptime!(rows * unroll * lanes));
            #[unroll]
            for u in 0..unroll {
                let su = s + u * stride;
                let sc = select(su < steps, su, steps - 1);
                #[unroll]
                for r in 0..rows {
                    // Rows past `n` (last cube) read the last row; their sums are not written.
                    let row = select(row0 + r < n_us, row0 + r, n_us - 1);
                    let slot = (u * rows + r) * lanes;
                    load_codes(
                        &mut q,
                        &mut a,
                        slot,
                        code_vec(row, sc, k as usize),
                        su < steps,
                        packed0,
                        absmax0,
                        packed1,
                        absmax1,
                        packed2,
                        absmax2,
                        in1,
                        in2,
                        gated,
                    );
                }
            }
            #[unroll]
            for u in 0..unroll {
                let su = s + u * stride;
                let sc = select(su < steps, su, steps - 1);
                if comptime!(tokens == 1) {
                    // `x` a vector of 8 at a time, each converted once for all rows: 8 f32
                    // live instead of 32. The registers cap the warps per SM: 72 per thread
                    // and 28 warps with 32 live, 56 and 36 warps with 8, the 14336-wide
                    // shapes 2-3% faster (docs/benchmarks.md, run 22). Each row's sum runs
                    // over the 32 weights in order, as before.
                    let mut dot = Array::<f32>::new(comptime!(rows * lanes));
                    #[unroll]
                    for w in 0..rows * lanes {
                        dot[w] = f32::new(0.0);
                    }
                    #[unroll]
                    for j in 0..4usize {
                        let xv = x[sc * 4 + j];
                        let mut xf = Array::<f32>::new(8usize);
                        #[unroll]
                        for i in 0..8usize {
                            xf[i] = f32::cast_from(xv[i]);
                        }
                        #[unroll]
                        for w in 0..rows * lanes {
                            #[unroll]
                            for i in 0..8usize {
                                dot[w] +=
                                    code_at(q[u * rows * lanes + w], &lut, comptime!(j * 8 + i))
                                        * xf[i];
                            }
                        }
                    }
                    #[unroll]
                    for w in 0..rows * lanes {
                        acc[w] += dot[w] * a[u * rows * lanes + w];
                    }
                } else {
                    #[unroll]
                    for w in 0..rows * lanes {
                        let mut c = Array::<f32>::new(32usize);
                        #[unroll]
                        for i in 0..32usize {
                            c[i] = code_at(q[u * rows * lanes + w], &lut, i);
                        }
                        #[unroll]
                        for t in 0..tokens {
                            let mut dot = f32::new(0.0);
                            #[unroll]
                            for j in 0..4usize {
                                let xv = x[t * xrow + sc * 4 + j];
                                #[unroll]
                                for i in 0..8usize {
                                    dot += c[j * 8 + i] * f32::cast_from(xv[i]);
                                }
                            }
                            acc[w * tokens + t] += dot * a[u * rows * lanes + w];
                        }
                    }
                }
            }
            s += stride * unroll;
        }
        #[unroll]
        for i in 0..width {
            let v = plane_sum(acc[i]);
            if UNIT_POS_X == 0 {
                partial[UNIT_POS_Y as usize * width + i] = v;
            }
        }
        sync_cube();
        // Unit `i < rows * tokens` finishes row `i / tokens` of token `i % tokens`.
        let i = UNIT_POS as usize;
        if i < rows * tokens {
            let r = i / tokens;
            let t = i % tokens;
            let row = row0 + r;
            if row < n_us {
                let mut total = f32::new(0.0);
                let mut second = f32::new(0.0);
                for p in 0..CUBE_DIM_Y as usize {
                    total += partial[p * width + r * lanes * tokens + t];
                    if comptime!(gated) {
                        second += partial[p * width + (r * lanes + 1) * tokens + t];
                    }
                }
                if comptime!(gated) {
                    out[t * n_us + row] = gate_times_up::<F>(total, second, gelu);
                } else {
                    out[out_base + t * n_us + row] = F::cast_from(total);
                }
            }
        }
    }

    /// [`nf4_gemv`] on tensor cores, for 3 to 64 token rows: the same weights, outputs and
    /// stacking (q/k/v) or gating (gate/up), one `mma.m16n8k16` (bf16 inputs, f32 accumulation)
    /// per 16 `k` of 8 output rows and 16 tokens. The SIMT GEMV does a multiply-add per weight
    /// and token; here a weight is dequantized once and the tensor cores take the tokens.
    ///
    /// A plane owns `groups` groups of 8 output rows (the MMA's n) and walks their `k` in
    /// windows of 128: in each group lane (g, t) = (lane / 4, lane % 4) loads one 16-byte
    /// vector of row g's codes (32 weights from `32t`, one absmax) and dequantizes them as
    /// bnb's dequantize rounds (code * absmax in f32, then to bf16): the B fragments of 8 MMAs.
    /// Which `k` an MMA slot holds is ours to choose, so long as `x` uses the same: MMA j takes
    /// from lane (g, t) its weights 4j, 4j+1 (fragment rows 2t, 2t+1) and 4j+2, 4j+3 (rows
    /// 2t+8, 2t+9), so the A fragment (tokens g and g+8 of a tile) is `x` at the same four
    /// positions. `tiles` tiles of 16 tokens reuse a group's B fragments, and every group reuses
    /// tile 0's A fragments (loaded with the codes; the other tiles' are loaded again by each
    /// group when its MMAs run, `x` being L1/L2-resident). Why groups: per window a plane reads 4 KiB of `x` per tile
    /// against 512 bytes of codes per group, so with one group the `x` side, not the weights,
    /// is most of the kernel's memory traffic (docs/benchmarks.md, run 17). Tokens past
    /// `tokens` read token 0's row and are never written. The cube's planes split the windows
    /// (split-K); their accumulators are summed in shared memory.
    ///
    /// Shapes as [`nf4_gemv`]; `k` a multiple of 128, every stacked weight but the last a
    /// multiple of `8 * groups` rows, `tokens <= 16 * tiles`, `groups * tiles <= 4`. Cube dim
    /// `(32, planes)`, a cube per `8 * groups` rows; `NX` = 8, `NQ4` = 4, `NP` = 2 (the MMA's
    /// registers: two bf16 or two f32).
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn nf4_mma<F: Float, NX: Size, NQ4: Size, NP: Size>(
        x: &Array<Vector<F, NX>>,
        packed0: &Array<Vector<u32, NQ4>>,
        absmax0: &Array<f32>,
        packed1: &Array<Vector<u32, NQ4>>,
        absmax1: &Array<f32>,
        packed2: &Array<Vector<u32, NQ4>>,
        absmax2: &Array<f32>,
        code: &Array<f32>,
        out: &mut Array<F>,
        n0: u32,
        n1: u32,
        n2: u32,
        cut1: u32,
        cut2: u32,
        base1: u32,
        base2: u32,
        k: u32,
        tokens: u32,
        #[comptime] unroll: usize,
        #[comptime] tiles: usize,
        #[comptime] groups: usize,
        #[comptime] gated: bool,
        #[comptime] gelu: bool,
        #[define(F)] _dtype: StorageType,
    ) {
        let lanes = comptime!(if gated { 2usize } else { 1usize });
        // Accumulators (and fragments) per lane: group gi, weight l (gate, up), tile tt at
        // `(gi * lanes + l) * tiles + tt`.
        let accs = comptime!(groups * lanes * tiles);
        let mut lut = SharedMemory::<f32>::new(16usize);
        let mut partial = SharedMemory::<f32>::new(comptime!(MAX_PLANES * 32 * 4 * accs));
        if UNIT_POS < 16 {
            lut[UNIT_POS as usize] = code[UNIT_POS as usize];
        }
        sync_cube();

        let cube = CUBE_POS_X as usize;
        let in1 = CUBE_POS_X >= cut1;
        let in2 = CUBE_POS_X >= cut2;
        let n_us = select(in2, n2, select(in1, n1, n0)) as usize;
        let first_cube = select(in2, cut2, select(in1, cut1, u32::new(0))) as usize;
        let out_base = select(in2, base2, select(in1, base1, u32::new(0))) as usize;
        let row0 = (cube - first_cube) * comptime!(8 * groups);
        let lane = UNIT_POS_X as usize;
        let g = lane / 4;
        let t = lane % 4;
        let tok = tokens as usize;
        let windows = k as usize / 128;
        let xrow = k as usize / 8;
        let x_lo = x_row(g, tok, xrow);
        let x_hi = x_row(g + 8, tok, xrow);
        let mma = cmma::MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
        let mut acc = Sequence::<Array<Vector<f32, NP>>>::new();
        #[unroll]
        for _ in 0..accs {
            let mut c = Array::<Vector<f32, NP>>::new(2usize);
            c[0] = Vector::new(f32::new(0.0));
            c[1] = Vector::new(f32::new(0.0));
            acc.push(c);
        }
        let stride = CUBE_DIM_Y as usize;
        let mut w = UNIT_POS_Y as usize;
        while w < windows {
            // Every load of `unroll` windows first, then the math. Group gi's codes of window
            // u at `(u * groups + gi) * lanes`.
            let mut q = Array::<Vector<u32, NQ4>>::new(comptime!(unroll * groups * lanes));
            let mut a = Array::<f32>::new(comptime!(unroll * groups * lanes));
            let mut xl = Array::<Vector<F, NX>>::new(comptime!(unroll * 4));
            let mut xh = Array::<Vector<F, NX>>::new(comptime!(unroll * 4));
            #[unroll]
            for u in 0..unroll {
                let wu = w + u * stride;
                // Windows past the end (last pass) read the last one with an absmax of 0.
                let wc = select(wu < windows, wu, windows - 1);
                #[unroll]
                for gi in 0..groups {
                    // Rows past `n` (last cube) read the last row; their sums are not written.
                    let r = row0 + comptime!(gi * 8) + g;
                    let row = select(r < n_us, r, n_us - 1);
                    load_codes(
                        &mut q,
                        &mut a,
                        comptime!((u * groups + gi) * lanes),
                        code_vec(row, wc * 4 + t, k as usize),
                        wu < windows,
                        packed0,
                        absmax0,
                        packed1,
                        absmax1,
                        packed2,
                        absmax2,
                        in1,
                        in2,
                        gated,
                    );
                }
                // The lane's 32 positions of tile 0's tokens g and g + 8: four 8-vectors each.
                let xo = wc * 16 + t * 4;
                #[unroll]
                for j in 0..4usize {
                    xl[u * 4 + j] = x[x_lo + xo + j];
                    xh[u * 4 + j] = x[x_hi + xo + j];
                }
            }
            #[unroll]
            for u in 0..unroll {
                let wc = select(w + u * stride < windows, w + u * stride, windows - 1);
                #[unroll]
                for gi in 0..groups {
                    // The group's B fragments, weight l's MMA j at `l * 8 + j`: dequantized
                    // once, used by every token tile.
                    let mut fbs = Sequence::<Array<Vector<F, NP>>>::new();
                    #[unroll]
                    for l in 0..lanes {
                        let qv = q[comptime!((u * groups + gi) * lanes + l)];
                        let s = a[comptime!((u * groups + gi) * lanes + l)];
                        #[unroll]
                        for j in 0..8usize {
                            let mut fb = Array::<Vector<F, NP>>::new(2usize);
                            fb[0] = pair::<F, NP>(
                                F::cast_from(code_at(qv, &lut, comptime!(4 * j)) * s),
                                F::cast_from(code_at(qv, &lut, comptime!(4 * j + 1)) * s),
                            );
                            fb[1] = pair::<F, NP>(
                                F::cast_from(code_at(qv, &lut, comptime!(4 * j + 2)) * s),
                                F::cast_from(code_at(qv, &lut, comptime!(4 * j + 3)) * s),
                            );
                            fbs.push(fb);
                        }
                    }
                    #[unroll]
                    for tt in 0..tiles {
                        let mut tl = Array::<Vector<F, NX>>::new(4usize);
                        let mut th = Array::<Vector<F, NX>>::new(4usize);
                        if comptime!(tt == 0) {
                            #[unroll]
                            for j in 0..4usize {
                                tl[j] = xl[u * 4 + j];
                                th[j] = xh[u * 4 + j];
                            }
                        } else {
                            let lo = g + comptime!(tt * 16);
                            let r_lo = x_row(lo, tok, xrow);
                            let r_hi = x_row(lo + 8, tok, xrow);
                            let xo = wc * 16 + t * 4;
                            #[unroll]
                            for j in 0..4usize {
                                tl[j] = x[r_lo + xo + j];
                                th[j] = x[r_hi + xo + j];
                            }
                        }
                        #[unroll]
                        for j in 0..8usize {
                            // MMA j: the lane's positions 4j..4j+4, in 8-vector j / 2 from
                            // element e.
                            let v = comptime!(j / 2);
                            let e = comptime!(j % 2 * 4);
                            let mut fa = Array::<Vector<F, NP>>::new(4usize);
                            fa[0] = pair::<F, NP>(tl[v][e], tl[v][e + 1]);
                            fa[1] = pair::<F, NP>(th[v][e], th[v][e + 1]);
                            fa[2] = pair::<F, NP>(tl[v][e + 2], tl[v][e + 3]);
                            fa[3] = pair::<F, NP>(th[v][e + 2], th[v][e + 3]);
                            #[unroll]
                            for l in 0..lanes {
                                mma.execute_inplace(
                                    &fa,
                                    fbs.index(comptime!(l * 8 + j)),
                                    acc.index_mut(comptime!((gi * lanes + l) * tiles + tt)),
                                );
                            }
                        }
                    }
                }
            }
            w += stride * unroll;
        }
        // Lane (g, t) holds, per group gi and tile tt, (token 16tt + g, rows 8gi + 2t,
        // 8gi + 2t + 1) and (token 16tt + g + 8, the same rows).
        let width = comptime!(4 * accs);
        let at = (UNIT_POS_Y as usize * 32 + lane) * width;
        #[unroll]
        for c in 0..accs {
            let sums = acc.index(c);
            #[unroll]
            for i in 0..4usize {
                partial[at + comptime!(c * 4 + i)] = sums[comptime!(i / 2)][comptime!(i % 2)];
            }
        }
        sync_cube();
        if UNIT_POS_Y == 0 {
            #[unroll]
            for gi in 0..groups {
                #[unroll]
                for tt in 0..tiles {
                    #[unroll]
                    for i in 0..4usize {
                        let token = g + comptime!(tt * 16 + i / 2 * 8);
                        let r = row0 + comptime!(gi * 8) + 2 * t + comptime!(i % 2);
                        let first = comptime!((gi * lanes * tiles + tt) * 4 + i);
                        let mut total = f32::new(0.0);
                        let mut second = f32::new(0.0);
                        for p in 0..CUBE_DIM_Y as usize {
                            total += partial[(p * 32 + lane) * width + first];
                            if comptime!(gated) {
                                second +=
                                    partial[(p * 32 + lane) * width + comptime!(first + tiles * 4)];
                            }
                        }
                        if token < tok && r < n_us {
                            if comptime!(gated) {
                                out[token * n_us + r] = gate_times_up::<F>(total, second, gelu);
                            } else {
                                out[out_base + token * n_us + r] = F::cast_from(total);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Where `token`'s row of `x` starts (rows of `xrow` vectors); a tile's padding past the
    /// `tokens` rows reads token 0's (never written back).
    #[cube]
    fn x_row(token: usize, tokens: usize, xrow: usize) -> usize {
        select(token < tokens, token, 0) * xrow
    }

    /// Two values as one MMA register (the first in the low half).
    #[cube]
    fn pair<F: Float, NP: Size>(lo: F, hi: F) -> Vector<F, NP> {
        let mut v = Vector::<F, NP>::empty();
        v[0] = lo;
        v[1] = hi;
        v
    }

    /// One step's codes of a row, for [`nf4_gemv`] and [`nf4_mma`]: the 16-byte code vector
    /// `idx` ([`code_vec`]) and its absmax (at `idx / 2`: [`crate::nf4::tile_absmax`]; 0 when
    /// not `live`, so a step past the end adds nothing) into `q[slot]`, `a[slot]`. Gated: gate's at `slot`, up's at `slot + 1`.
    /// Else the stacked weight this cube's rows belong to (`in1`, `in2`: uniform over the cube,
    /// no divergence).
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn load_codes<NQ4: Size>(
        q: &mut Array<Vector<u32, NQ4>>,
        a: &mut Array<f32>,
        slot: usize,
        idx: usize,
        live: bool,
        packed0: &Array<Vector<u32, NQ4>>,
        absmax0: &Array<f32>,
        packed1: &Array<Vector<u32, NQ4>>,
        absmax1: &Array<f32>,
        packed2: &Array<Vector<u32, NQ4>>,
        absmax2: &Array<f32>,
        in1: bool,
        in2: bool,
        #[comptime] gated: bool,
    ) {
        let block = idx / 2;
        if comptime!(gated) {
            q[slot] = packed0[idx];
            a[slot] = select(live, absmax0[block], f32::new(0.0));
            q[slot + 1] = packed1[idx];
            a[slot + 1] = select(live, absmax1[block], f32::new(0.0));
        } else {
            if in2 {
                q[slot] = packed2[idx];
                a[slot] = select(live, absmax2[block], f32::new(0.0));
            } else if in1 {
                q[slot] = packed1[idx];
                a[slot] = select(live, absmax1[block], f32::new(0.0));
            } else {
                q[slot] = packed0[idx];
                a[slot] = select(live, absmax0[block], f32::new(0.0));
            }
        }
    }

    /// `act(gate) * up`, rounded as HF's bf16 ops round: each projection to `F` (a no-op for
    /// values already in `F`), the activation (f32 inside) to `F`, the product to `F`. Shared
    /// by [`gated_act`] and the gated GEMV's epilogue, so both round alike.
    #[cube]
    fn gate_times_up<F: Float>(gate: f32, up: f32, #[comptime] gelu: bool) -> F {
        let g = f32::cast_from(F::cast_from(gate));
        let a = activation(g, gelu);
        F::cast_from(f32::cast_from(F::cast_from(a)) * f32::cast_from(F::cast_from(up)))
    }

    /// SiLU, or GELU with the tanh approximation, in f32.
    #[cube]
    fn activation(g: f32, #[comptime] gelu: bool) -> f32 {
        // SiLU: x / (1 + e^-x)
        let mut a = g / (f32::new(1.0) + (-g).exp());
        if gelu {
            // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            let inner = f32::new(0.797_884_6) * (g + f32::new(0.044_715) * g * g * g);
            a = f32::new(0.5) * g * (f32::new(1.0) + inner.tanh());
        }
        a
    }

    /// Dequantize to `out` (`[n, k]`, row-major): [`DEQUANT_WORDS`] packed words (8 weights
    /// each) per unit, `DEQUANT_UNITS` apart in the tiled layout (each pass's reads coalesced;
    /// a row's 16 words of a window tile, 8 in a half-width last window, are 128 or 64
    /// consecutive outputs), each written as one 16-byte vector. `words`: the tiled buffer's
    /// (rows padded to 16), `k` weights per row. The words and their absmax are loaded before
    /// the code book's barrier, so a cube's loads are in flight while it fills the table. (One word per unit before: 43.8 us
    /// for 14336x4096 in run 19, 42.1 us now, run 20: it was near the copy bandwidth already.)
    #[cube(launch_unchecked)]
    pub fn nf4_dequantize<F: Float, NO: Size>(
        packed: &Array<u32>,
        absmax: &Array<f32>,
        code: &Array<f32>,
        out: &mut Array<Vector<F, NO>>,
        words: u32,
        n: u32,
        k: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let first = CUBE_POS * DEQUANT_UNITS * DEQUANT_WORDS + UNIT_POS as usize;
        let k = k as usize;
        let mut word = Array::<u32>::new(DEQUANT_WORDS);
        let mut scale = Array::<f32>::new(DEQUANT_WORDS);
        // Where tiled word `w` goes: word `jw` of row `row`, the 8-vector `target` of the
        // row-major output (`live` 0 past `words` or `n`: nowhere).
        let mut target = Array::<usize>::new(DEQUANT_WORDS);
        let mut live = Array::<u32>::new(DEQUANT_WORDS);
        #[unroll]
        for j in 0..DEQUANT_WORDS {
            let w = first + j * DEQUANT_UNITS;
            let at = select(w < words as usize, w, 0);
            // Inverse of [`code_word`]: 16 rows x 16 words per window tile (8 words in a last
            // window of 64 weights).
            let within = at % (k * 2);
            let window = within / 256;
            let width = select(window < k / 128, 16usize, 8usize);
            let r = within % 256 / width;
            let row = (at / (k * 2)) * 16 + r;
            let jw = window * 16 + within % 256 % width;
            let inside = w < words as usize && row < n as usize;
            let row = select(inside, row, 0);
            word[j] = packed[at];
            // Tiled like the words ([`crate::nf4::tile_absmax`]).
            scale[j] = absmax[at / 8];
            target[j] = row * (k / 8) + jw;
            live[j] = select(inside, 1u32, 0u32);
        }
        let mut lut = SharedMemory::<f32>::new(16usize);
        if UNIT_POS < 16 {
            lut[UNIT_POS as usize] = code[UNIT_POS as usize];
        }
        sync_cube();
        #[unroll]
        for j in 0..DEQUANT_WORDS {
            if live[j] == 1 {
                let mut v = Vector::<F, NO>::empty();
                #[unroll]
                for i in 0..8usize {
                    let shift = comptime!(nibble_shift(i));
                    v[i] = F::cast_from(lut[((word[j] >> shift) & 0xF) as usize] * scale[j]);
                }
                out[target[j]] = v;
            }
        }
    }

    /// Units per cube of [`nf4_dequantize`].
    pub const DEQUANT_UNITS: usize = 256;
    /// Packed words per unit of [`nf4_dequantize`].
    pub const DEQUANT_WORDS: usize = 4;

    /// Dequantize to `out` `[k, n]`: the weight's transpose, row-major, the layout a dense
    /// matmul reads as its right-hand side without a strided view. A cube per 64 x 64 tile
    /// (cube `(x, y)`: weight rows `64x..`, columns `64y..`, one absmax block per row): the
    /// tile is read a row's 8 words at a time, dequantized into shared memory transposed
    /// (stride 65: two-way bank conflicts at most), and written out 32 consecutive outputs
    /// per plane. `k` a multiple of 64; rows past `n` are skipped. Cube dim 256.
    #[cube(launch_unchecked)]
    pub fn nf4_dequantize_t<F: Float>(
        packed: &Array<u32>,
        absmax: &Array<f32>,
        code: &Array<f32>,
        out: &mut Array<F>,
        n: u32,
        k: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let mut lut = SharedMemory::<f32>::new(16usize);
        let mut tile = SharedMemory::<f32>::new(64usize * 65usize);
        let u = UNIT_POS as usize;
        if u < 16 {
            lut[u] = code[u];
        }
        sync_cube();
        let (n, k) = (n as usize, k as usize);
        let n0 = CUBE_POS_X as usize * 64;
        let k0 = CUBE_POS_Y as usize * 64;
        // 64 rows x 8 words, two per unit.
        #[unroll]
        for pass in 0..2usize {
            let idx = u + pass * 256;
            let r = idx / 8;
            let wi = idx % 8;
            if n0 + r < n {
                // Tiled ([`code_word`]): row n0 + r's 8 words of block k0 / 64.
                let word = packed[code_word(n0 + r, k0 / 8 + wi, k)];
                // The block's words are consecutive: its absmax at any one's index / 8.
                let a = absmax[code_word(n0 + r, k0 / 8, k) / 8];
                #[unroll]
                for i in 0..8usize {
                    let shift = comptime!(nibble_shift(i));
                    tile[(wi * 8 + i) * 65 + r] = lut[((word >> shift) & 0xF) as usize] * a;
                }
            }
        }
        sync_cube();
        // Output rows k0..k0+64, columns n0..n0+64: element e of the tile at (e / 64, e % 64).
        #[unroll]
        for step in 0..16usize {
            let e = step * 256 + u;
            let (kr, c) = (e / 64, e % 64);
            if n0 + c < n {
                out[(k0 + kr) * n + n0 + c] = F::cast_from(tile[kr * 65 + c]);
            }
        }
    }

    /// RMSNorm of one row per cube (HF `LlamaRMSNorm.forward`): the sum of squares in f32
    /// over the cube's units, reduced over planes and then the cube; `x * rsqrt(mean + eps)`
    /// rounded to `F` (HF's `.to(input_dtype)`), then times the weight, rounded again. With
    /// `unit_offset` (HF `Gemma2RMSNorm.forward`): `x * rsqrt(mean + eps) * (1 + w)` all in
    /// f32, rounded once.
    /// `x`, `out` `[rows, hidden]` contiguous, `w` `[hidden]`. Cube dim `(32, planes)`.
    #[cube(launch_unchecked)]
    pub fn rms_norm<F: Float>(
        x: &Array<F>,
        w: &Array<F>,
        out: &mut Array<F>,
        hidden: u32,
        eps: f32,
        #[comptime] unit_offset: bool,
        #[define(F)] _dtype: StorageType,
    ) {
        let h = hidden as usize;
        let base = CUBE_POS_X as usize * h;
        let mut acc = f32::new(0.0);
        let mut i = UNIT_POS as usize;
        while i < h {
            let v = f32::cast_from(x[base + i]);
            acc += v * v;
            i += CUBE_DIM as usize;
        }
        let inv = rms_inverse(acc, hidden, eps);
        scale_rows(x, w, out, base, h, inv, unit_offset);
    }

    /// [`rms_norm`] of `x + r`, the sum (rounded to `F`, as HF's bf16 residual add) also
    /// written to `sum`. The second pass reads back `sum` at the indices the same unit wrote.
    #[cube(launch_unchecked)]
    pub fn add_rms_norm<F: Float>(
        x: &Array<F>,
        r: &Array<F>,
        w: &Array<F>,
        sum: &mut Array<F>,
        out: &mut Array<F>,
        hidden: u32,
        eps: f32,
        #[comptime] unit_offset: bool,
        #[define(F)] _dtype: StorageType,
    ) {
        let h = hidden as usize;
        let base = CUBE_POS_X as usize * h;
        let mut acc = f32::new(0.0);
        let mut i = UNIT_POS as usize;
        while i < h {
            let s = F::cast_from(f32::cast_from(x[base + i]) + f32::cast_from(r[base + i]));
            sum[base + i] = s;
            let v = f32::cast_from(s);
            acc += v * v;
            i += CUBE_DIM as usize;
        }
        let inv = rms_inverse(acc, hidden, eps);
        scale_rows(sum, w, out, base, h, inv, unit_offset);
    }

    /// `rsqrt(mean + eps)` from each unit's partial sum of squares: reduced over each plane,
    /// then over the cube's planes in shared memory.
    #[cube]
    fn rms_inverse(acc: f32, hidden: u32, eps: f32) -> f32 {
        let mut partial = SharedMemory::<f32>::new(MAX_PLANES);
        let s = plane_sum(acc);
        if UNIT_POS_X == 0 {
            partial[UNIT_POS_Y as usize] = s;
        }
        sync_cube();
        let mut total = f32::new(0.0);
        for p in 0..CUBE_DIM_Y as usize {
            total += partial[p];
        }
        (total / f32::cast_from(hidden) + eps).inverse_sqrt()
    }

    /// `out = w * F(x * inv)` over one row (each unit the indices it summed); with
    /// `unit_offset`, `out = F(x * inv * (1 + w))`.
    #[cube]
    fn scale_rows<F: Float>(
        x: &Array<F>,
        w: &Array<F>,
        out: &mut Array<F>,
        base: usize,
        h: usize,
        inv: f32,
        #[comptime] unit_offset: bool,
    ) {
        let mut i = UNIT_POS as usize;
        while i < h {
            let normed = f32::cast_from(x[base + i]) * inv;
            if unit_offset {
                out[base + i] = F::cast_from(normed * (f32::new(1.0) + f32::cast_from(w[i])));
            } else {
                let normed = f32::cast_from(F::cast_from(normed));
                out[base + i] = F::cast_from(f32::cast_from(w[i]) * normed);
            }
            i += CUBE_DIM as usize;
        }
    }

    /// Rotary embedding, one unit per (row, head, i < d/2) writing elements `i` and `i + d/2`:
    /// `x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x2, x1)`, each product and
    /// the sum rounded to `F` as HF's bf16 ops are. `x` `[rows, heads, d]` contiguous, `cos`,
    /// `sin` `[rows, d]`, `out` `[heads, rows, d]` (the layout attention takes).
    #[cube(launch_unchecked)]
    pub fn rope<F: Float>(
        x: &Array<F>,
        cos: &Array<F>,
        sin: &Array<F>,
        out: &mut Array<F>,
        rows: u32,
        heads: u32,
        d: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let rows = rows as usize;
        let heads = heads as usize;
        let d = d as usize;
        let half = d / 2;
        let idx = ABSOLUTE_POS;
        if idx < rows * heads * half {
            let i = idx % half;
            let h = idx / half % heads;
            let r = idx / half / heads;
            rotate_half_into(
                x,
                cos,
                sin,
                out,
                (r * heads + h) * d,
                (h * rows + r) * d,
                r * d,
                i,
                half,
            );
        }
    }

    /// Elements `i` and `i + half` of one head of one row: `x` from `src`, `cos`/`sin` row
    /// from `t`, written to `out` at `dst`.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn rotate_half_into<F: Float>(
        x: &Array<F>,
        cos: &Array<F>,
        sin: &Array<F>,
        out: &mut Array<F>,
        src: usize,
        dst: usize,
        t: usize,
        i: usize,
        half: usize,
    ) {
        let x1 = x[src + i];
        let x2 = x[src + i + half];
        let a = x1 * cos[t + i];
        let b = -x2 * sin[t + i];
        out[dst + i] = a + b;
        let a = x2 * cos[t + i + half];
        let b = x1 * sin[t + i + half];
        out[dst + i + half] = a + b;
    }

    /// A KV-cache append in place: rope on `k` and both written at positions
    /// `start..start + rows` of the caches, one unit per (row, head, i < d/2) as in [`rope`].
    /// `k`, `v` `[rows, heads, d]` contiguous (the projections' outputs), `cos`, `sin`
    /// `[rows, d]`, `k_cache`, `v_cache` `[heads, cap, d]`.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append<F: Float>(
        k: &Array<F>,
        v: &Array<F>,
        cos: &Array<F>,
        sin: &Array<F>,
        k_cache: &mut Array<F>,
        v_cache: &mut Array<F>,
        rows: u32,
        heads: u32,
        d: u32,
        cap: u32,
        start: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let rows = rows as usize;
        let heads = heads as usize;
        let d = d as usize;
        let half = d / 2;
        let idx = ABSOLUTE_POS;
        if idx < rows * heads * half {
            let i = idx % half;
            let h = idx / half % heads;
            let r = idx / half / heads;
            let src = (r * heads + h) * d;
            let dst = (h * cap as usize + start as usize + r) * d;
            rotate_half_into(k, cos, sin, k_cache, src, dst, r * d, i, half);
            v_cache[dst + i] = v[src + i];
            v_cache[dst + i + half] = v[src + i + half];
        }
    }

    /// `act(gate) * up`, one unit per element: the activation in f32, rounded to `F` (as
    /// PyTorch's bf16 SiLU / GELU-tanh), then the product, rounded. `gelu`: GELU with the tanh
    /// approximation, else SiLU. All three `[n]` contiguous.
    #[cube(launch_unchecked)]
    pub fn gated_act<F: Float>(
        gate: &Array<F>,
        up: &Array<F>,
        out: &mut Array<F>,
        n: u32,
        #[comptime] gelu: bool,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i < n as usize {
            out[i] = gate_times_up::<F>(f32::cast_from(gate[i]), f32::cast_from(up[i]), gelu);
        }
    }

    /// Attention of one query row per head over a sequence's cached keys and values (decode),
    /// in one pass ("flash decoding" within a cube): a cube per query head; its planes take
    /// positions in turn, each plane's 32 units split the head dim (`per_unit` each), the
    /// score `q . k_t` is a plane sum, and each plane keeps an online softmax (running max,
    /// sum, weighted sum of `v`); the planes' partial results are merged in shared memory.
    /// All in f32; the output rounded to `F` once. GQA: head `h` reads kv head `h / groups`
    /// (no repeated K/V). Positions before `t_start` are outside the sliding window; `softcap`
    /// > 0 applies `softcap * tanh(s / softcap)` to the scaled scores (Gemma-2).
    /// `q` `[heads, d]`, `k`/`v` `[kv_heads, cap, d]` with positions `0..t_len` filled,
    /// `out` `[heads, d]`, all contiguous, `d = 32 * per_unit`. Cube dim `(32, planes)`.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention<F: Float>(
        q: &Array<F>,
        k: &Array<F>,
        v: &Array<F>,
        out: &mut Array<F>,
        t_len: u32,
        cap: u32,
        t_start: u32,
        groups: u32,
        scale: f32,
        softcap: f32,
        #[comptime] per_unit: usize,
        #[comptime] planes: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let d = per_unit * 32;
        let head = CUBE_POS_X as usize;
        let kv_base = head / groups as usize * cap as usize * d;
        attend_row::<F>(
            q,
            k,
            v,
            out,
            head * d,
            kv_base,
            head * d,
            t_start as usize,
            t_len as usize,
            scale,
            softcap,
            per_unit,
            planes,
        );
    }

    /// [`decode_attention`] for every row of a step whose caches are slots of one pool (decode
    /// rows, and short prompt chunks: their rows are already appended, so attending up to each
    /// row's own position is causal), in one launch: cube `(head, row)`; row `r` reads slot
    /// `rows_meta[2r]`, positions up to its own `rows_meta[2r + 1]` (inclusive), from
    /// `window` positions back when `window` > 0 (sliding window).
    /// `q` `[heads, rows, d]`, `k_pool`/`v_pool` `[slots, kv_heads, cap, d]`, `out`
    /// `[rows, heads * d]`, all contiguous. Cube dim `(32, planes)`.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention_rows<F: Float>(
        q: &Array<F>,
        k_pool: &Array<F>,
        v_pool: &Array<F>,
        out: &mut Array<F>,
        rows_meta: &Array<i32>,
        rows: u32,
        kv_heads: u32,
        cap: u32,
        window: u32,
        groups: u32,
        scale: f32,
        softcap: f32,
        #[comptime] per_unit: usize,
        #[comptime] planes: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let d = per_unit * 32;
        let head = CUBE_POS_X as usize;
        let r = CUBE_POS_Y as usize;
        let heads = CUBE_COUNT_X as usize;
        let slot = u32::cast_from(rows_meta[2 * r]) as usize;
        let t_len = u32::cast_from(rows_meta[2 * r + 1]) + 1;
        let t_start = select(window > 0 && t_len > window, t_len - window, u32::new(0));
        let kv_base = ((slot * kv_heads as usize + head / groups as usize) * cap as usize) * d;
        attend_row::<F>(
            q,
            k_pool,
            v_pool,
            out,
            (head * rows as usize + r) * d,
            kv_base,
            (r * heads + head) * d,
            t_start as usize,
            t_len as usize,
            scale,
            softcap,
            per_unit,
            planes,
        );
    }

    /// One query row over one kv head's cached positions `t_start..t_len` ("flash decoding"
    /// within a cube, see [`decode_attention`]): `q` from `q_off`, keys and values from
    /// `kv_base` (position `t` at `kv_base + t * d`), the output row at `out_off`.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn attend_row<F: Float>(
        q: &Array<F>,
        k: &Array<F>,
        v: &Array<F>,
        out: &mut Array<F>,
        q_off: usize,
        kv_base: usize,
        out_off: usize,
        t_start: usize,
        t_len: usize,
        scale: f32,
        softcap: f32,
        #[comptime] per_unit: usize,
        #[comptime] planes: usize,
    ) {
        let d = per_unit * 32;
        let lane = UNIT_POS_X as usize;
        let plane = UNIT_POS_Y as usize;
        let col = lane * per_unit;
        let mut qv = Array::<f32>::new(per_unit);
        let mut acc = Array::<f32>::new(per_unit);
        #[unroll]
        for i in 0..per_unit {
            qv[i] = f32::cast_from(q[q_off + col + i]);
            acc[i] = f32::new(0.0);
        }
        // Finite start values: an empty plane merges with weight exp(-1e30 - max) = 0.
        let mut m = f32::new(-1e30);
        let mut l = f32::new(0.0);
        let mut t = t_start + plane;
        while t < t_len {
            let row = kv_base + t * d + col;
            let mut part = f32::new(0.0);
            #[unroll]
            for i in 0..per_unit {
                part += qv[i] * f32::cast_from(k[row + i]);
            }
            let mut s = plane_sum(part) * scale;
            if softcap > f32::new(0.0) {
                s = softcap * (s / softcap).tanh();
            }
            let m_new = max(m, s);
            let correction = (m - m_new).exp();
            let p = (s - m_new).exp();
            l = l * correction + p;
            #[unroll]
            for i in 0..per_unit {
                acc[i] = acc[i] * correction + p * f32::cast_from(v[row + i]);
            }
            m = m_new;
            t += planes;
        }
        let mut sm_m = SharedMemory::<f32>::new(planes);
        let mut sm_l = SharedMemory::<f32>::new(planes);
        let mut sm_acc = SharedMemory::<f32>::new(planes * d);
        if lane == 0 {
            sm_m[plane] = m;
            sm_l[plane] = l;
        }
        #[unroll]
        for i in 0..per_unit {
            sm_acc[plane * d + col + i] = acc[i];
        }
        sync_cube();
        if plane == 0 {
            let mut mm = f32::new(-1e30);
            for p in 0..planes {
                mm = max(mm, sm_m[p]);
            }
            let mut ll = f32::new(0.0);
            for p in 0..planes {
                ll += sm_l[p] * (sm_m[p] - mm).exp();
            }
            #[unroll]
            for i in 0..per_unit {
                let mut a = f32::new(0.0);
                for p in 0..planes {
                    a += sm_acc[p * d + col + i] * (sm_m[p] - mm).exp();
                }
                out[out_off + col + i] = F::cast_from(a / ll);
            }
        }
    }

    /// The softmax of one prompt chunk's attention scores ([`LlmBackend::chunk_attention`]:
    /// the scores come from a cuBLAS product, already scaled), row by row, masked: row
    /// `(h, r)` is the query at position `start + r`, which sees keys `lo..=start + r` (`lo`
    /// = `start + r + 1 - window` when a sliding window bites, else 0); every other key gets
    /// probability 0, so the product with the values that follows may run over all `total`
    /// keys. `softcap` > 0 applies `softcap * tanh(s / softcap)` first (Gemma-2, HF
    /// `eager_attention_forward`). In f32, as HF's softmax (`dtype=torch.float32`); the
    /// probabilities rounded to `F` once (HF rounds them to the query's dtype before `@ v`).
    ///
    /// One pass for the running maximum and sum (online softmax, as [`attend_row`]), merged over
    /// each plane and then the cube's planes in shared memory; a second pass writes.
    /// `scores`, `probs` `[heads, len, total]` contiguous; cube `(32, planes)` per row.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn chunk_softmax<F: Float>(
        scores: &Array<f32>,
        probs: &mut Array<F>,
        len: u32,
        total: u32,
        start: u32,
        window: u32,
        softcap: f32,
        #[comptime] planes: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let row = CUBE_POS_X as usize;
        let total = total as usize;
        let hi = start as usize + row % len as usize + 1;
        let lo = select(
            window > 0 && hi > window as usize,
            hi - window as usize,
            0usize,
        );
        let base = row * total;
        let lane = UNIT_POS_X as usize;
        let plane = UNIT_POS_Y as usize;
        let stride = CUBE_DIM as usize;
        // Finite start values: a unit without keys merges with weight exp(-1e30 - max) = 0.
        let mut m = f32::new(-1e30);
        let mut l = f32::new(0.0);
        let mut j = lo + UNIT_POS as usize;
        while j < hi {
            let s = capped(scores[base + j], softcap);
            let m_new = max(m, s);
            l = l * (m - m_new).exp() + (s - m_new).exp();
            m = m_new;
            j += stride;
        }
        let pm = plane_max(m);
        let pl = plane_sum(l * (m - pm).exp());
        let mut sm_m = SharedMemory::<f32>::new(planes);
        let mut sm_l = SharedMemory::<f32>::new(planes);
        if lane == 0 {
            sm_m[plane] = pm;
            sm_l[plane] = pl;
        }
        sync_cube();
        let mut mm = f32::new(-1e30);
        for p in 0..planes {
            mm = max(mm, sm_m[p]);
        }
        let mut ll = f32::new(0.0);
        for p in 0..planes {
            ll += sm_l[p] * (sm_m[p] - mm).exp();
        }
        let inv = f32::new(1.0) / ll;
        let mut j = UNIT_POS as usize;
        while j < total {
            let mut p = f32::new(0.0);
            if j >= lo && j < hi {
                p = (capped(scores[base + j], softcap) - mm).exp() * inv;
            }
            probs[base + j] = F::cast_from(p);
            j += stride;
        }
    }

    /// `softcap * tanh(s / softcap)` when `softcap` > 0, else `s`.
    #[cube]
    fn capped(s: f32, softcap: f32) -> f32 {
        let mut out = s;
        if softcap > f32::new(0.0) {
            out = softcap * (s / softcap).tanh();
        }
        out
    }

    /// [`kv_append`] for a batch whose caches are slots of one pool: row `r` goes to slot
    /// `rows_meta[2r]` at position `rows_meta[2r + 1]`, one unit per (row, head, i < d/2).
    /// `k`, `v` `[rows, heads, d]`, `cos`, `sin` `[rows, d]`, the pools
    /// `[slots, heads, cap, d]`, all contiguous.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append_rows<F: Float>(
        k: &Array<F>,
        v: &Array<F>,
        cos: &Array<F>,
        sin: &Array<F>,
        k_pool: &mut Array<F>,
        v_pool: &mut Array<F>,
        rows_meta: &Array<i32>,
        rows: u32,
        heads: u32,
        d: u32,
        cap: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let rows = rows as usize;
        let heads = heads as usize;
        let d = d as usize;
        let half = d / 2;
        let idx = ABSOLUTE_POS;
        if idx < rows * heads * half {
            let i = idx % half;
            let h = idx / half % heads;
            let r = idx / half / heads;
            let slot = u32::cast_from(rows_meta[2 * r]) as usize;
            let pos = u32::cast_from(rows_meta[2 * r + 1]) as usize;
            let src = (r * heads + h) * d;
            let dst = ((slot * heads + h) * cap as usize + pos) * d;
            rotate_half_into(k, cos, sin, k_pool, src, dst, r * d, i, half);
            v_pool[dst + i] = v[src + i];
            v_pool[dst + i + half] = v[src + i + half];
        }
    }
}

/// Which fused kernel a [`GemvConfig`] launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvKernel {
    /// [`nf4_gemv`]: SIMT, 1 to [`GEMV_MAX_TOKENS`] token rows.
    Simt,
    /// [`nf4_mma`]: tensor cores, up to [`MMA_MAX_TOKENS`] token rows; `rows` 8, 16 or 32 (its
    /// groups of 8).
    Mma,
    /// [`crate::gemv_tc`]: tensor cores, hand-written CUDA, one token; `rows` 16 or 32 (its
    /// tiles of 16), up to [`crate::gemv_tc::TC_MAX_PLANES`] planes, `k` a multiple of 128.
    Tc,
}

/// How [`nf4_gemv`], [`nf4_mma`] or [`crate::gemv_tc`] is launched: output rows per cube,
/// planes (warps) per cube, and steps (16-byte code vectors per row; windows of 4 for the MMA
/// kernel; windows ahead for `Tc`, 1 or 3) each unit loads before its math.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvConfig {
    pub rows: usize,
    pub planes: usize,
    pub unroll: usize,
    pub kernel: GemvKernel,
}

impl GemvConfig {
    /// One token: [`GemvKernel::Tc`] where [`MMA_DECODE`] and [`TC_DECODE`] are on (the launch
    /// falls back where the shapes do not fit: [`GemvConfig::fitted`]), else
    /// [`GemvConfig::simt_one_token`]. From [`MMA_MIN_TOKENS`] to [`MMA_MAX_TOKENS`] tokens: [`nf4_mma`] when [`MMA_DECODE`] is
    /// on and `k` is a multiple of 128. Otherwise 2 rows per cube, the looked-up codes shared
    /// over the tokens (see the kernel's doc), 2 planes. `n` is the output rows the launch
    /// covers (stacked weights together; gated: one of gate and up).
    ///
    /// The GEMV's from the launch-configuration sweep of `llm-bench kernel` on an H200
    /// (docs/benchmarks.md, run 11: at batch 1 the configurations within 10% of each other; at
    /// batch 16 this one 166 us against 298 us for 1 row per cube on 4096x14336). The MMA
    /// kernel's from run 19's sweep (4096x4096, 14336x4096, 4096x14336): one token tile, 16
    /// rows per cube (2 groups sharing each `x` fragment) on 8 planes, 4 past 512 cubes (the
    /// 14336-row shape: 37.3 us against 43.6 for run 18's 32 rows on 8); two tiles, 16 rows on
    /// 4 planes with 2 windows in flight (14336x4096: 58.6 us against 75.0); three or four, 8
    /// rows on 4 planes (49.3 us against 77.4 at 4096x4096).
    pub fn for_shape(tokens: usize, n: usize, k: usize) -> GemvConfig {
        let mma = MMA_DECODE.load(std::sync::atomic::Ordering::Relaxed);
        if tokens == 1 && mma && TC_DECODE.load(std::sync::atomic::Ordering::Relaxed) {
            // A plane per 4 windows of 128, at most 16; one window loaded ahead. The best of
            // run 25's sweep on each 8B shape (docs/benchmarks.md).
            GemvConfig {
                rows: 16,
                planes: (k / 128 / 4).clamp(1, 16),
                unroll: 1,
                kernel: GemvKernel::Tc,
            }
        } else if tokens == 1 {
            GemvConfig::simt_one_token(k)
        } else if (MMA_MIN_TOKENS..=MMA_MAX_TOKENS).contains(&tokens)
            && k.is_multiple_of(128)
            && mma
        {
            let windows = (k / 128 / 4).clamp(1, MAX_PLANES);
            let (rows, planes, unroll) = match tokens.div_ceil(16) {
                1 if n.div_ceil(16) > 512 => (16, windows.min(4), 1),
                1 => (16, windows, 1),
                2 => (16, windows.min(4), 2),
                _ => (8, windows.min(4), 1),
            };
            GemvConfig {
                rows,
                planes,
                unroll,
                kernel: GemvKernel::Mma,
            }
        } else {
            GemvConfig {
                rows: 2,
                planes: 2,
                unroll: 1,
                kernel: GemvKernel::Simt,
            }
        }
    }

    /// This configuration, or the SIMT GEMV's where [`GemvKernel::Tc`] cannot take the shapes:
    /// `k` not a multiple of 128, or a stacked weight but the last not a multiple of the cube's
    /// rows (`n`: the output rows of each weight launched together).
    pub fn fitted(self, n: &[usize], k: usize, gated: bool) -> GemvConfig {
        let fits = k.is_multiple_of(128)
            && (gated || n[..n.len() - 1].iter().all(|n| n.is_multiple_of(self.rows)));
        if self.kernel == GemvKernel::Tc && !fits {
            GemvConfig::simt_one_token(k)
        } else {
            self
        }
    }

    /// [`nf4_gemv`] at one token: 4 rows per cube share each converted `x`, about 64 steps per
    /// unit's row.
    fn simt_one_token(k: usize) -> GemvConfig {
        GemvConfig {
            rows: 4,
            planes: (k / 32 / 64).clamp(1, MAX_PLANES),
            unroll: 1,
            kernel: GemvKernel::Simt,
        }
    }
}

/// One [`nf4_gemv`] launch over `weights` (1 to 3, same `in_features` and code book): stacked
/// into `out`, weight `i`'s `[tokens, n_i]` from element `bases[i]`, or `gated`
/// (`[gate, up]`: `act(gate) * up` into `out` `[tokens, n]`).
fn launch_gemv(
    x: CubeTensor<CudaRuntime>,
    weights: &[&CudaNf4Linear],
    out: CubeTensor<CudaRuntime>,
    bases: [usize; 3],
    cfg: GemvConfig,
    gated: Option<Activation>,
) {
    let tokens = x.meta.shape()[0];
    assert!((1..=3).contains(&weights.len()));
    let w0 = weights[0];
    let k = w0.in_features;
    for w in weights {
        assert!(
            w.in_features == k && w.code_host == w0.code_host,
            "stacked NF4 weights differ"
        );
    }
    let n: Vec<usize> = weights.iter().map(|w| w.out_features).collect();
    let cfg = cfg.fitted(&n, k, gated.is_some());
    let (most, max_planes) = match cfg.kernel {
        GemvKernel::Simt => (GEMV_MAX_TOKENS, MAX_PLANES),
        GemvKernel::Mma => (MMA_MAX_TOKENS, MAX_PLANES),
        GemvKernel::Tc => (1, crate::gemv_tc::TC_MAX_PLANES),
    };
    assert!((1..=most).contains(&tokens));
    assert!(cfg.rows >= 1 && cfg.unroll >= 1 && (1..=max_planes).contains(&cfg.planes));
    // `nf4_gemv`'s units `i < rows * tokens` each finish one row of one token.
    assert!(cfg.kernel != GemvKernel::Simt || cfg.rows * tokens <= 32 * cfg.planes);
    // Every stacked weight but the last fills its cubes exactly: fewer MMA row groups where a
    // stacked part is no multiple of the cube's rows (8 always divides them: checked below).
    let mut cfg = cfg;
    while cfg.kernel == GemvKernel::Mma
        && gated.is_none()
        && cfg.rows > 8
        && !n[..n.len() - 1].iter().all(|n| n.is_multiple_of(cfg.rows))
    {
        cfg.rows /= 2;
    }
    let cubes_of = |n: usize| n.div_ceil(cfg.rows);
    // Where stacked weights 1 and 2 start (cube index); past the end when absent or gated.
    let mut cuts = [u32::MAX; 2];
    let cubes = match gated {
        Some(_) => {
            assert!(weights.len() == 2 && n[0] == n[1], "gate and up shapes");
            cubes_of(n[0])
        }
        None => {
            // Every stacked weight but the last fills its cubes exactly.
            assert!(n[..n.len() - 1].iter().all(|n| n.is_multiple_of(cfg.rows)));
            let mut first = 0;
            for (i, &n) in n.iter().enumerate() {
                if i > 0 {
                    cuts[i - 1] = first as u32;
                }
                first += cubes_of(n);
            }
            first
        }
    };
    let pick = |i: usize| weights.get(i).copied().unwrap_or(w0);
    // Every kernel's sizes: n0, n1, n2, cut1, cut2, base1, base2, k.
    let sizes: [u32; 8] = [
        n[0] as u32,
        pick(1).out_features as u32,
        pick(2).out_features as u32,
        cuts[0],
        cuts[1],
        bases[1] as u32,
        bases[2] as u32,
        k as u32,
    ];
    let x = into_contiguous(x);
    let client = x.client.clone();
    let dtype = x.dtype;
    // The two kernels take the same buffers and sizes; they differ in their vector sizes and
    // comptime switches.
    macro_rules! launch {
        ($kernel:ident, [$($size:expr),*], $tokens:expr, [$($comptime:expr),*]) => {
            $kernel::launch_unchecked::<CudaRuntime>(
                &client,
                CubeCount::Static(cubes as u32, 1, 1),
                CubeDim::new_2d(32, cfg.planes as u32),
                $($size,)*
                x.into_array_arg(),
                pick(0).packed.clone().into_array_arg(),
                pick(0).absmax.clone().into_array_arg(),
                pick(1).packed.clone().into_array_arg(),
                pick(1).absmax.clone().into_array_arg(),
                pick(2).packed.clone().into_array_arg(),
                pick(2).absmax.clone().into_array_arg(),
                w0.code.clone().into_array_arg(),
                out.into_array_arg(),
                sizes[0],
                sizes[1],
                sizes[2],
                sizes[3],
                sizes[4],
                sizes[5],
                sizes[6],
                sizes[7],
                $tokens,
                $($comptime,)*
                gated.is_some(),
                gated == Some(Activation::GeluTanh),
                dtype.into(),
            )
        };
    }
    if cfg.kernel == GemvKernel::Tc {
        assert!(matches!(cfg.rows, 16 | 32), "tensor-core GEMV rows");
        let variant = crate::gemv_tc::TcVariant {
            planes: cfg.planes,
            tiles: cfg.rows / 16,
            gated: gated.is_some(),
            gelu: gated == Some(Activation::GeluTanh),
            depth: cfg.unroll,
        };
        let handle = |t: &CubeTensor<CudaRuntime>| t.handle.clone();
        let buffers = crate::gemv_tc::TcBuffers {
            x: x.handle.clone(),
            packed: [0, 1, 2].map(|i| handle(&pick(i).packed)),
            absmax: [0, 1, 2].map(|i| handle(&pick(i).absmax)),
            code: handle(&w0.code),
            out: out.handle.clone(),
        };
        // SAFETY: as for `nf4_gemv` below: one token (`x` `[1, k]` contiguous, k a multiple of
        // 128: `fitted`), each `packed_i`/`absmax_i` (tiled) holding `n_i * k` weights (rows padded to 16), rows past
        // `n_i` clamped on read and skipped on write, every stacked weight but the last filling
        // its cubes (`fitted`), `out` holding `bases[i] + n_i` elements per stacked weight (or
        // `n0` gated).
        unsafe { crate::gemv_tc::launch(&client, variant, cubes as u32, buffers, sizes) };
    } else if cfg.kernel == GemvKernel::Mma {
        let (tiles, groups) = (tokens.div_ceil(16), cfg.rows / 8);
        assert!(
            matches!(cfg.rows, 8 | 16 | 32) && groups * tiles <= 4 && k.is_multiple_of(128),
            "MMA GEMV shapes"
        );
        // SAFETY: as for `nf4_gemv` below, with `8 * groups` rows per cube, windows of 128 `k`
        // (a multiple of 128, asserted), `tiles * 16 >= tokens` token rows of which those past
        // `tokens` read token 0's row and are never written, and `partial` holding
        // `MAX_PLANES * 32 * 4 * groups * lanes * tiles` sums (at most 32 KiB: `groups *
        // tiles <= 4`, asserted).
        unsafe {
            launch!(
                nf4_mma,
                [8, 4, 2],
                tokens as u32,
                [cfg.unroll, tiles, groups]
            )
        };
    } else {
        // SAFETY: every index the kernel forms is in bounds for these shapes: `x` is `[tokens, k]`
        // contiguous, each `packed_i`/`absmax_i` (tiled) holds `n_i * k` weights (rows padded to 16; k a multiple of 64,
        // checked at construction), steps past `k` and rows past `n_i` are clamped on read and add
        // nothing / are skipped on write, a cube's stacked part is found from the cube counts
        // above, `out` holds `bases[i] + tokens * n_i` elements for each stacked weight (blocks not
        // overlapping) or `tokens * n0` (gated), and `partial` holds `MAX_PLANES * rows * lanes *
        // tokens` sums (planes checked).
        unsafe { launch!(nf4_gemv, [8, 4], tokens, [cfg.rows, cfg.unroll]) };
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
    /// The code book as uploaded (weights launched together must share it).
    code_host: [f32; 16],
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
    let handle: Handle = crate::driver::copy_in(&client, device, bytes)
        .unwrap_or_else(|| client.create_from_slice(bytes));
    CubeTensor::new_contiguous(client, device.clone(), Shape::from(shape), handle, dtype)
}

/// f32 values as the bytes a copy takes.
struct F32Bytes(Vec<f32>);

impl AsRef<[u8]> for F32Bytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl CudaNf4Linear {
    pub fn new(weight: Nf4Weight, bias: Option<Tensor<CudaBf16, 1>>, device: &CudaDevice) -> Self {
        Self::with_uploads(weight, bias, |_, shape, dtype, bytes| {
            upload(device, (*bytes()).as_ref(), shape, dtype)
        })
    }

    /// [`Self::new`] with the copies queued ([`crate::driver::copy_in_queued`]), for loads:
    /// the next weight is quantized on the host while this one's bytes go to the device, the
    /// double-quantized absmax expanded on the upload thread too. The buffers may be read only
    /// after [`crate::driver::finish_uploads`] ([`LlmBackend::finish_uploads`]).
    pub fn new_queued(
        weight: Nf4Weight,
        bias: Option<Tensor<CudaBf16, 1>>,
        device: &CudaDevice,
    ) -> Self {
        let client = CudaRuntime::client(device);
        Self::with_uploads(weight, bias, |len, shape, dtype, bytes| {
            match crate::driver::copy_in_queued(&client, device, len, bytes) {
                Ok(handle) => CubeTensor::new_contiguous(
                    client.clone(),
                    device.clone(),
                    Shape::from(shape),
                    handle,
                    dtype,
                ),
                // No upload thread: copied now, as `new` does.
                Err(bytes) => upload(device, (*bytes()).as_ref(), shape, dtype),
            }
        })
    }

    /// The weight's buffers on the device, each put there by `put(bytes, shape, dtype, make)`
    /// (`make` gives the `bytes` bytes when called): packed codes, the f32 absmax (expanded
    /// from its double quantization by `make`) and the code book.
    fn with_uploads(
        mut weight: Nf4Weight,
        bias: Option<Tensor<CudaBf16, 1>>,
        mut put: impl FnMut(usize, Vec<usize>, DType, UploadBytes) -> CubeTensor<CudaRuntime>,
    ) -> Self {
        // The GEMV walks 32-weight (4-word) steps that never straddle an absmax block.
        assert!(
            weight.in_features.is_multiple_of(BLOCKSIZE),
            "in_features must be a multiple of 64"
        );
        let (rows, k) = (weight.out_features, weight.in_features);
        let (packed_len, stored_bytes) = (weight.packed.len(), weight.stored_bytes());
        let packed = std::mem::take(&mut weight.packed);
        // Tiled (on the upload thread when queued); rows padded to a multiple of 16.
        let tiled_len = crate::nf4::tiled_len(rows, k);
        let packed = put(
            tiled_len,
            vec![tiled_len / 4],
            DType::U32,
            Box::new(move || Box::new(crate::nf4::tile_codes(&packed, rows, k))),
        );
        let absmax = std::mem::replace(&mut weight.absmax, Absmax::Plain(Vec::new()));
        // Tiled like the codes ([`crate::nf4::tile_absmax`]): a code word `w`'s absmax at `w / 8`.
        let blocks = tiled_len / 32;
        let absmax = put(
            4 * blocks,
            vec![blocks],
            DType::F32,
            Box::new(move || {
                Box::new(F32Bytes(crate::nf4::tile_absmax(&absmax.to_f32(), rows, k)))
            }),
        );
        // Put as the others are (queued by `new_queued`: a copy made on this thread would wait
        // for the context, and so for the upload thread's copy in flight).
        let code: Vec<u8> = weight.code.iter().flat_map(|a| a.to_le_bytes()).collect();
        let code = put(64, vec![16], DType::F32, Box::new(move || Box::new(code)));
        CudaNf4Linear {
            packed,
            absmax,
            code,
            bias,
            out_features: weight.out_features,
            in_features: weight.in_features,
            code_host: weight.code,
            packed_len,
            stored_bytes,
        }
    }

    /// The fused GEMV into a caller-provided output `[tokens, out]` (tests poison it first),
    /// with [`GemvConfig::for_shape`].
    pub fn gemv_into(
        &self,
        x: CubeTensor<CudaRuntime>,
        out: CubeTensor<CudaRuntime>,
    ) -> CubeTensor<CudaRuntime> {
        let tokens = x.meta.shape()[0];
        let cfg = GemvConfig::for_shape(tokens, self.out_features, self.in_features);
        self.gemv_into_with(x, out, cfg)
    }

    /// [`Self::gemv_into`] with an explicit launch configuration (the bench sweeps them).
    pub fn gemv_into_with(
        &self,
        x: CubeTensor<CudaRuntime>,
        out: CubeTensor<CudaRuntime>,
        cfg: GemvConfig,
    ) -> CubeTensor<CudaRuntime> {
        launch_gemv(x, &[self], out.clone(), [0; 3], cfg, None);
        out
    }

    /// The weight dequantized to a bf16 `[out, in]` tensor.
    pub fn dequantize(&self) -> Tensor<CudaBf16, 2> {
        from_cube(self.dequantize_into(self.empty_bf16([self.out_features, self.in_features])))
    }

    /// The weight dequantized into `out`, a contiguous bf16 `[out, in]` tensor.
    fn dequantize_into(&self, out: CubeTensor<CudaRuntime>) -> CubeTensor<CudaRuntime> {
        assert_eq!(
            out.meta.shape().num_elements(),
            self.out_features * self.in_features
        );
        assert!(
            out.dtype == DType::BF16 && out.is_contiguous(),
            "bf16 [out, in]"
        );
        let client = self.packed.client.clone();
        let (n, k) = (self.out_features, self.in_features);
        let words = (crate::nf4::tiled_len(n, k) / 4) as u32;
        // SAFETY: each unit reads tiled words `w < words` (the buffer's, rows padded to 16; word
        // 0 in place of the others), the absmax of the row and block a word belongs to (row 0
        // for padding rows), and writes that word's 8-vector of the `[out, in]` output for
        // rows `< n` only.
        let per_cube = (DEQUANT_UNITS * DEQUANT_WORDS) as u32;
        unsafe {
            nf4_dequantize::launch_unchecked::<CudaRuntime>(
                &client,
                CubeCount::Static(words.div_ceil(per_cube), 1, 1),
                CubeDim::new_1d(DEQUANT_UNITS as u32),
                8,
                self.packed.clone().into_array_arg(),
                self.absmax.clone().into_array_arg(),
                self.code.clone().into_array_arg(),
                out.clone().into_array_arg(),
                words,
                n as u32,
                k as u32,
                DType::BF16.into(),
            );
        }
        out
    }

    /// An uninitialised bf16 tensor on this weight's device.
    fn empty_bf16(&self, shape: [usize; 2]) -> CubeTensor<CudaRuntime> {
        empty_device_contiguous_dtype(
            self.packed.client.clone(),
            self.packed.device.clone(),
            Shape::from(shape.to_vec()),
            DType::BF16,
        )
    }
}

impl CudaNf4Linear {
    /// `x W^T` through the fused GEMV (`tokens <= GEMV_MAX_TOKENS`, or up to [`MMA_MAX_TOKENS`]
    /// where [`GemvConfig::for_shape`] picks [`nf4_mma`]).
    pub fn forward_gemv(&self, x: Tensor<CudaBf16, 2>) -> Tensor<CudaBf16, 2> {
        let cfg = GemvConfig::for_shape(x.dims()[0], self.out_features, self.in_features);
        self.forward_gemv_with(x, cfg)
    }

    /// [`Self::forward_gemv`] launched as `cfg` says (decided once by the caller).
    fn forward_gemv_with(&self, x: Tensor<CudaBf16, 2>, cfg: GemvConfig) -> Tensor<CudaBf16, 2> {
        let [tokens, _] = x.dims();
        let x = x.into_primitive().tensor();
        let out = empty_device_contiguous_dtype(
            x.client.clone(),
            x.device.clone(),
            Shape::from(vec![tokens, self.out_features]),
            x.dtype,
        );
        from_cube(self.gemv_into_with(x, out, cfg))
    }

    /// `x W^T (+ b)` by dequantizing to bf16 and cuBLAS (what `forward` does past the fused
    /// kernels' rows, [`fused_config`], unless `LLM_CUDA_GEMM=burn`); `None` when cuBLAS is off
    /// or absent.
    pub fn forward_cublas(&self, x: Tensor<CudaBf16, 2>) -> Option<Tensor<CudaBf16, 2>> {
        prefill_gemms(&x, &[self]).map(|mut y| y.remove(0))
    }

    /// `x W^T` by dequantizing to bf16 and a dense matmul: against the `[in, out]` transpose
    /// written by [`nf4_dequantize_t`], or (with [`DEQUANT_TRANSPOSED`] off) against a
    /// transposed view of the `[out, in]` weight.
    pub fn forward_dequant(&self, x: Tensor<CudaBf16, 2>) -> Tensor<CudaBf16, 2> {
        x.matmul(self.dequantized_rhs())
    }

    /// `W^T` `[in, out]` in bf16 as [`Self::forward_dequant`]'s matmul takes it: contiguous
    /// ([`Self::dequantize_t`]), or with [`DEQUANT_TRANSPOSED`] off a transposed view of
    /// [`Self::dequantize`].
    pub fn dequantized_rhs(&self) -> Tensor<CudaBf16, 2> {
        if DEQUANT_TRANSPOSED.load(std::sync::atomic::Ordering::Relaxed) {
            self.dequantize_t()
        } else {
            self.dequantize().transpose()
        }
    }

    /// The weight dequantized to its bf16 transpose, `[in, out]` row-major.
    pub fn dequantize_t(&self) -> Tensor<CudaBf16, 2> {
        let client = self.packed.client.clone();
        let (n, k) = (self.out_features, self.in_features);
        let out = self.empty_bf16([k, n]);
        // SAFETY: cube (x, y) reads rows 64x.. (< n) of the tiled codes ([`code_word`]: within
        // the buffer, rows padded to 16), columns 64y..64y+64
        // (< k: k is a multiple of 64, asserted in `new`), their absmax blocks, and writes the
        // same elements of the [k, n] output.
        unsafe {
            nf4_dequantize_t::launch_unchecked::<CudaRuntime>(
                &client,
                CubeCount::Static(n.div_ceil(64) as u32, (k / 64) as u32, 1),
                CubeDim::new_1d(256),
                self.packed.clone().into_array_arg(),
                self.absmax.clone().into_array_arg(),
                self.code.clone().into_array_arg(),
                out.clone().into_array_arg(),
                n as u32,
                k as u32,
                DType::BF16.into(),
            );
        }
        from_cube(out)
    }
}

impl CudaNf4Linear {
    /// `y + bias` (broadcast over rows) when the layer has one.
    fn with_bias(&self, y: Tensor<CudaBf16, 2>) -> Tensor<CudaBf16, 2> {
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze_dim(0),
            None => y,
        }
    }
}

/// Prefill (more rows than the GEMV takes): `x W_i^T (+ b_i)` for each of `layers`, every
/// weight dequantized to bf16 `[out, in]` into one buffer and all the GEMMs run by cuBLAS
/// ordered against CubeCL's stream by [`crate::driver::linears`], into one output buffer handed out as a
/// contiguous tensor per layer. `None` when cuBLAS is off or absent (the caller uses Burn's
/// matmul).
fn prefill_gemms(
    x: &Tensor<CudaBf16, 2>,
    layers: &[&CudaNf4Linear],
) -> Option<Vec<Tensor<CudaBf16, 2>>> {
    if !crate::driver::available() {
        return None;
    }
    let [tokens, _] = x.dims();
    let x = contiguous(x);
    let (w_at, w_len) = sub_buffers(&x, layers.iter().map(|l| l.out_features * l.in_features));
    let (out_at, out_len) = sub_buffers(&x, layers.iter().map(|l| tokens * l.out_features));
    let w = empty_like(&x, vec![w_len]);
    let out = empty_like(&x, vec![out_len]);
    for (l, &at) in layers.iter().zip(&w_at) {
        l.dequantize_into(sub_tensor(&w, at, vec![l.out_features, l.in_features]));
    }
    let parts: Vec<crate::driver::Part> = layers
        .iter()
        .zip(w_at.iter().zip(&out_at))
        .map(|(l, (&w_at, &out_at))| crate::driver::Part {
            n: l.out_features,
            w_at,
            out_at,
        })
        .collect();
    if !crate::driver::linears(&x, &w, &out, &parts) {
        return None;
    }
    Some(
        layers
            .iter()
            .zip(out_at)
            .map(|(l, at)| {
                l.with_bias(from_cube(sub_tensor(
                    &out,
                    at,
                    vec![tokens, l.out_features],
                )))
            })
            .collect(),
    )
}

/// Where consecutive blocks of `lens` elements (of `like`'s dtype) start in one buffer, each
/// aligned as CubeCL aligns sub-buffers, and the buffer's length in elements.
fn sub_buffers(
    like: &CubeTensor<CudaRuntime>,
    lens: impl Iterator<Item = usize>,
) -> (Vec<usize>, usize) {
    let elem = like.dtype.size();
    let align = like.client.properties().memory.alignment as usize;
    let mut end = 0;
    let starts = lens
        .map(|len| {
            let start = end;
            end += (len * elem).next_multiple_of(align) / elem;
            start
        })
        .collect();
    (starts, end)
}

/// The contiguous tensor of `shape` from element `start` of the flat buffer `buf`.
fn sub_tensor(
    buf: &CubeTensor<CudaRuntime>,
    start: usize,
    shape: Vec<usize>,
) -> CubeTensor<CudaRuntime> {
    let elem = buf.dtype.size() as u64;
    let total = buf.meta.shape().num_elements() as u64 * elem;
    let bytes = shape.iter().product::<usize>() as u64 * elem;
    let start = start as u64 * elem;
    let handle = buf
        .handle
        .clone()
        .offset_start(start)
        .offset_end(total - start - bytes);
    CubeTensor::new_contiguous(
        buf.client.clone(),
        buf.device.clone(),
        Shape::from(shape),
        handle,
        buf.dtype,
    )
}

/// `linears` as [`CudaNf4Linear`]s of input width `k`, or `None` when any is another kind.
fn nf4_layers<'a>(
    k: usize,
    linears: &[&'a dyn Linear<CudaBf16>],
) -> Option<Vec<&'a CudaNf4Linear>> {
    let group: Vec<&CudaNf4Linear> = linears
        .iter()
        .map(|l| l.as_any().downcast_ref::<CudaNf4Linear>())
        .collect::<Option<_>>()?;
    group.iter().all(|w| w.in_features == k).then_some(group)
}

/// How NF4 layers of input width `k` launch `rows` through the fused kernels (the GEMV, or
/// [`nf4_mma`]'s token tiles up to [`MMA_TOKENS`]); `None`: dequantize + matmul. Decided once
/// per forward and handed to the launch: [`MMA_DECODE`] is process-wide and a load on another
/// GPU may turn it off meanwhile ([`probe_mma`]), which must not send 17+ rows to the SIMT GEMV.
fn fused_config(rows: usize, n: usize, k: usize) -> Option<GemvConfig> {
    use std::sync::atomic::Ordering::Relaxed;
    let cfg = GemvConfig::for_shape(rows, n, k);
    let fused = rows <= GEMV_TOKENS.load(Relaxed)
        || (rows <= MMA_TOKENS.load(Relaxed) && cfg.kernel == GemvKernel::Mma);
    fused.then_some(cfg)
}

impl Linear<CudaBf16> for CudaNf4Linear {
    fn forward(&self, x: Tensor<CudaBf16, 2>) -> Tensor<CudaBf16, 2> {
        let [tokens, k] = x.dims();
        assert_eq!(k, self.in_features, "linear input width");
        if let Some(cfg) = fused_config(tokens, self.out_features, k) {
            self.with_bias(self.forward_gemv_with(x, cfg))
        } else if let Some(y) = self.forward_cublas(x.clone()) {
            y
        } else {
            self.with_bias(self.forward_dequant(x))
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
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// `linears` as NF4 layers one [`nf4_gemv`] / [`nf4_mma`] launch can take for `x`: each a
/// [`CudaNf4Linear`] without bias, the same input width (`k`) and code book. `None` otherwise
/// (the caller runs each layer).
fn nf4_group<'a>(k: usize, linears: &[&'a dyn Linear<CudaBf16>]) -> Option<Vec<&'a CudaNf4Linear>> {
    if linears.len() > 3 || !FUSED_PROJECTIONS.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let group = nf4_layers(k, linears)?;
    let same = |w: &&CudaNf4Linear| w.bias.is_none() && w.code_host == group[0].code_host;
    group.iter().all(same).then_some(group)
}

/// Point CubeCL's caches of compiled kernels (PTX) and autotune results at `dir`, once per
/// plugin (each plugin links its own CubeCL, whose configuration is read once, at first use).
/// Without them every process compiles each kernel with NVRTC and benchmarks each matmul and
/// attention candidate again: ~100 s per load on an H200 whatever the model, plus stalls at
/// each new shape. With them that is paid once per machine.
///
/// The directory gets a subdirectory per plugin build (package version and a hash of this
/// file, which holds our own kernels), so a rebuilt kernel never meets a stale PTX entry of the
/// same kernel id. CubeCL's own kernels change only with its version, which the lock file pins.
/// A `cubecl.toml` in the working directory still applies for everything else (logging,
/// autotune level); `None` leaves CubeCL's defaults untouched.
pub fn use_kernel_cache(dir: Option<&std::path::Path>) {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Some(dir) = dir else { return };
        if CubeClRuntimeConfig::storage().lock().is_some() {
            // Already read (a load ran before): it cannot change for this process.
            return;
        }
        let build = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            // (nf4_gemv_tc.cu's hash is in its own kernel id: gemv_tc.rs.)
            include_str!("cuda.rs").hash(&mut h);
            format!("{}-{:016x}", env!("CARGO_PKG_VERSION"), h.finish())
        };
        let dir = dir.join(build);
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.compilation.cache = Some(CacheConfig::File(dir.clone()));
        config.autotune.cache = CacheConfig::File(dir);
        CubeClRuntimeConfig::set(config);
    });
}

/// Turn [`MMA_DECODE`] off when `device` has no bf16 `mma.m16n8k16` (before Ampere).
pub fn probe_mma(device: &CudaDevice) {
    use burn_cubecl::cubecl::features::MmaConfig;
    let (bf16, f32) = (DType::BF16.into(), DType::F32.into());
    let wanted = MmaConfig {
        a_type: bf16,
        b_type: bf16,
        cd_type: f32,
        m: 16,
        n: 8,
        k: 16,
    };
    let client = CudaRuntime::client(device);
    if !client.properties().features.matmul.mma.contains(&wanted) {
        MMA_DECODE.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Benchmark switches from the environment: `LLM_CUDA_MMA=0` turns [`MMA_DECODE`] off;
/// `LLM_CUDA_GEMV_TC=0` turns [`TC_DECODE`] off;
/// `LLM_CUDA_MMA_ROWS=N` sets [`MMA_TOKENS`];
/// `LLM_CUDA_DEQUANT=nk` turns
/// [`DEQUANT_TRANSPOSED`] off, `kn` (the default) on; prefill GEMMs go to cuBLAS when the
/// library loads (and CUPTI finds CubeCL's stream, [`crate::driver`]), unless
/// `LLM_CUDA_GEMM=burn` keeps Burn's matmul (`cublas`, the default, asks for cuBLAS); another
/// value is reported and ignored. Every load reads it again (a failed cuBLAS call turns
/// cuBLAS off until then).
pub fn read_env() {
    let cublas = match std::env::var("LLM_CUDA_GEMM").as_deref() {
        Ok("burn") => false,
        Ok("cublas") | Err(_) => true,
        Ok(other) => {
            eprintln!("LLM_CUDA_GEMM={other} ignored (cublas or burn)");
            true
        }
    };
    crate::driver::USE_CUBLAS.store(cublas, std::sync::atomic::Ordering::Relaxed);
    if let Ok(v) = std::env::var("LLM_CUDA_MMA_ROWS") {
        match v.parse::<usize>() {
            Ok(n) if n <= MMA_MAX_TOKENS => {
                MMA_TOKENS.store(n, std::sync::atomic::Ordering::Relaxed)
            }
            _ => eprintln!("LLM_CUDA_MMA_ROWS={v} ignored (a row count up to {MMA_MAX_TOKENS})"),
        }
    }
    match std::env::var("LLM_CUDA_MMA").as_deref() {
        Ok("0") => MMA_DECODE.store(false, std::sync::atomic::Ordering::Relaxed),
        Ok("1") => MMA_DECODE.store(true, std::sync::atomic::Ordering::Relaxed),
        Ok(other) => eprintln!("LLM_CUDA_MMA={other} ignored (0 or 1)"),
        Err(_) => {}
    }
    match std::env::var("LLM_CUDA_GEMV_TC").as_deref() {
        Ok("0") => TC_DECODE.store(false, std::sync::atomic::Ordering::Relaxed),
        Ok("1") | Err(_) => TC_DECODE.store(true, std::sync::atomic::Ordering::Relaxed),
        Ok(other) => eprintln!("LLM_CUDA_GEMV_TC={other} ignored (0 or 1)"),
    }
    if let Ok(v) = std::env::var("LLM_CUDA_CHUNK_ATTENTION_ROWS") {
        match v.parse::<usize>() {
            Ok(n) => CHUNK_ATTENTION_ROWS.store(n.max(1), std::sync::atomic::Ordering::Relaxed),
            _ => eprintln!("LLM_CUDA_CHUNK_ATTENTION_ROWS={v} ignored (a row count)"),
        }
    }
    match std::env::var("LLM_CUDA_DEQUANT").as_deref() {
        Ok("nk") => DEQUANT_TRANSPOSED.store(false, std::sync::atomic::Ordering::Relaxed),
        Ok("kn") => DEQUANT_TRANSPOSED.store(true, std::sync::atomic::Ordering::Relaxed),
        Ok(other) => eprintln!("LLM_CUDA_DEQUANT={other} ignored (nk or kn)"),
        Err(_) => {}
    }
}

/// The driver's (free, total) memory of device `spec` ("cuda" / "cuda:N").
pub fn device_memory(spec: &str) -> Option<(Option<u64>, Option<u64>)> {
    let ordinal = match spec {
        "cuda" => 0,
        _ => spec.strip_prefix("cuda:")?.parse().ok()?,
    };
    let ctx = cudarc::driver::CudaContext::new(ordinal).ok()?;
    let (free, total) = ctx.mem_get_info().ok()?;
    Some((Some(free as u64), Some(total as u64)))
}

impl LlmBackend for CudaBf16 {
    const DTYPE: &'static str = "bf16";
    const JIT: bool = true;
    fn pool_reserved_bytes(device: &CudaDevice) -> Option<u64> {
        CudaRuntime::client(device)
            .memory_usage()
            .ok()
            .map(|u| u.bytes_reserved)
    }
    const WARM_UP_NF4_DECODE_ROWS: usize = GEMV_MAX_TOKENS;
    /// 32 rows (2 tiles) is the common warm-up's; 3 and 4 tiles; then Burn's matmul at the
    /// row counts its autotune keys round to (powers of two) up to the server's default step
    /// budget (`--max-step-tokens` 512): run 16 saw 3.7-4 s steps where a wave of prompts met
    /// an untuned one mid-serving.
    const WARM_UP_NF4_PROMPT_ROWS: &'static [usize] = &[48, MMA_MAX_TOKENS, 128, 256, 512];
    const KV_POOL: bool = true;
    /// Strictly contiguous (the pooled kernels index it flat; see [`Self::kv_append`]).
    fn kv_pool_tensor(shape: [usize; 4], device: &CudaDevice) -> Tensor<Self, 4> {
        from_cube(empty_device_contiguous_dtype(
            CudaRuntime::client(device),
            device.clone(),
            Shape::from(shape.to_vec()),
            DType::BF16,
        ))
    }
    fn kv_append_rows(
        k: &Tensor<Self, 2>,
        v: &Tensor<Self, 2>,
        kv_heads: usize,
        tables: &RopeTables<Self>,
        pool: &PoolLayer<Self>,
        rows_meta: &Tensor<Self, 1, Int>,
    ) -> bool {
        let [rows, width] = k.dims();
        let d = width / kv_heads;
        let [_, pool_heads, cap, pool_d] = pool.k.dims();
        assert!(pool_heads == kv_heads && pool_d == d, "KV pool shape");
        assert_eq!(rows_meta.dims()[0], 2 * rows, "pool rows");
        let (cos, sin) = rope_tables(tables, rows, d);
        let k = contiguous(k);
        let units = (rows * kv_heads * d / 2) as u32;
        // SAFETY: unit `u < rows * kv_heads * d / 2` reads row `r < rows` of `k` and `v`
        // (`[rows, kv_heads * d]` contiguous), of `cos`/`sin` (`[rows, d]`, checked) and
        // entries `2r`, `2r + 1` of `rows_meta` (`[2 * rows]`, checked), and writes position
        // `rows_meta[2r + 1] < cap` of slot `rows_meta[2r] < slots` of the pools
        // (`[slots, kv_heads, cap, d]` strictly contiguous): the forward builds `rows_meta`
        // from the slots it leased and positions the engine checked against the context (=
        // `cap`).
        unsafe {
            kv_append_rows::launch_unchecked::<CudaRuntime>(
                &k.client.clone(),
                CubeCount::Static(units.div_ceil(256), 1, 1),
                CubeDim::new_1d(256),
                k.clone().into_array_arg(),
                contiguous(v).into_array_arg(),
                cos.into_array_arg(),
                sin.into_array_arg(),
                contiguous(&pool.k).into_array_arg(),
                contiguous(&pool.v).into_array_arg(),
                rows_meta.clone().into_primitive().into_array_arg(),
                rows as u32,
                kv_heads as u32,
                d as u32,
                cap as u32,
                k.dtype.into(),
            );
        }
        true
    }
    fn decode_attention_rows(
        q: &Tensor<Self, 3>,
        pool: &PoolLayer<Self>,
        rows_meta: &Tensor<Self, 1, Int>,
        cfg: &AttentionConfig,
    ) -> Option<Tensor<Self, 2>> {
        let [heads, rows, d] = q.dims();
        let [_, kv_heads, cap, _] = pool.k.dims();
        // As `decode_attention`: head dims 32..256 in steps of 32. A launch grid's y extent
        // (the rows) is at most 65535.
        if !d.is_multiple_of(32) || d / 32 > 8 || heads % kv_heads != 0 || rows > 65535 {
            return None;
        }
        assert_eq!(rows_meta.dims()[0], 2 * rows, "pool rows");
        let q = contiguous(q);
        let out = empty_like(&q, vec![rows, heads * d]);
        const PLANES: usize = 8;
        // SAFETY: cube `(h, r)` reads row `r` of head `h` of `q` (`[heads, rows, d]`
        // contiguous), entries `2r`, `2r + 1` of `rows_meta` (`[2 * rows]`, checked), positions
        // below `rows_meta[2r + 1] + 1 <= cap` of kv head `h / groups` of slot `rows_meta[2r]`
        // of the pools (`[slots, kv_heads, cap, d]` strictly contiguous; `heads = groups *
        // kv_heads`), and writes row `r`, head `h` of `out` (`[rows, heads * d]`); shared
        // memory is sized by the comptime plane count the cube is launched with.
        unsafe {
            decode_attention_rows::launch_unchecked::<CudaRuntime>(
                &q.client.clone(),
                CubeCount::Static(heads as u32, rows as u32, 1),
                CubeDim::new_2d(32, PLANES as u32),
                q.clone().into_array_arg(),
                contiguous(&pool.k).into_array_arg(),
                contiguous(&pool.v).into_array_arg(),
                out.clone().into_array_arg(),
                rows_meta.clone().into_primitive().into_array_arg(),
                rows as u32,
                kv_heads as u32,
                cap as u32,
                cfg.sliding_window.unwrap_or(0) as u32,
                (heads / kv_heads) as u32,
                cfg.scale as f32,
                cfg.softcap.unwrap_or(0.0) as f32,
                d / 32,
                PLANES,
                q.dtype.into(),
            );
        }
        Some(from_cube(out))
    }
    /// Scores, softmax and values of one sequence's chunk as two strided-batched cuBLAS GEMMs
    /// over the kv heads with [`chunk_softmax`] between them, HF's eager attention in three
    /// launches. GQA without repeated keys: the `g` query heads of kv head `j` are contiguous
    /// in `q` `[heads, len, d]`, so group `j`'s queries are one `[g * len, d]` matrix against
    /// kv head `j`'s `[total, d]` keys of the slot.
    ///
    /// In cuBLAS's column-major terms (a row-major `[r, c]` is a column-major `[c, r]`):
    /// scores `S_j` `[g * len, total]` (row-major, f32) = `K_j^T` as `op(A)` (`A` = keys
    /// `[d, total]`, transposed) times `Q_j` (`[d, g * len]`), alpha = the attention scale;
    /// values `O_j` `[g * len, d]` = `V_j` (`[d, total]`) times `P_j` (`[total, g * len]`),
    /// into `[heads, len, d]`, then swapped to `[len, heads * d]`.
    fn chunk_attention(
        q: &Tensor<Self, 3>,
        pool: &PoolLayer<Self>,
        slot: usize,
        start: usize,
        cfg: &AttentionConfig,
    ) -> Option<Tensor<Self, 2>> {
        use crate::driver::{batched_gemm, Operand};
        let [heads, len, d] = q.dims();
        let [slots, kv_heads, cap, pool_d] = pool.k.dims();
        let total = start + len;
        if len < CHUNK_ATTENTION_ROWS.load(std::sync::atomic::Ordering::Relaxed)
            || pool_d != d
            || !heads.is_multiple_of(kv_heads)
            || slot >= slots
            || total > cap
            || heads * len * total > CHUNK_ATTENTION_MAX_SCORES
            || !crate::driver::available()
        {
            return None;
        }
        let g = heads / kv_heads;
        let q = contiguous(q);
        let (k, v) = (contiguous(&pool.k), contiguous(&pool.v));
        let client = q.client.clone();
        let scores = empty_device_contiguous_dtype(
            client.clone(),
            q.device.clone(),
            Shape::from(vec![heads, len, total]),
            DType::F32,
        );
        let slot_at = slot * kv_heads * cap * d;
        let keys = Operand::new(&k, slot_at, d, cap * d);
        let queries = Operand::new(&q, 0, d, g * len * d);
        let s_out = Operand::new(&scores, 0, total, g * len * total);
        let dims = [total, g * len, d];
        if !batched_gemm(
            dims,
            kv_heads,
            cfg.scale as f32,
            keys,
            true,
            queries,
            false,
            s_out,
        ) {
            return None;
        }
        let probs = empty_like(&q, vec![heads, len, total]);
        const PLANES: usize = 4;
        // SAFETY: cube `row < heads * len` reads and writes row `row` of `scores` and `probs`
        // (`[heads, len, total]` contiguous, `total` elements per row); shared memory is sized
        // by the comptime plane count the cube is launched with.
        unsafe {
            chunk_softmax::launch_unchecked::<CudaRuntime>(
                &client,
                CubeCount::Static((heads * len) as u32, 1, 1),
                CubeDim::new_2d(32, PLANES as u32),
                scores.clone().into_array_arg(),
                probs.clone().into_array_arg(),
                len as u32,
                total as u32,
                start as u32,
                cfg.sliding_window.unwrap_or(0) as u32,
                cfg.softcap.unwrap_or(0.0) as f32,
                PLANES,
                q.dtype.into(),
            );
        }
        let out = empty_like(&q, vec![heads, len, d]);
        let values = Operand::new(&v, slot_at, d, cap * d);
        let p_in = Operand::new(&probs, 0, total, g * len * total);
        let o_out = Operand::new(&out, 0, d, g * len * d);
        if !batched_gemm(
            [d, g * len, total],
            kv_heads,
            1.0,
            values,
            false,
            p_in,
            false,
            o_out,
        ) {
            return None;
        }
        Some(
            from_cube::<3>(out)
                .swap_dims(0, 1)
                .reshape([len, heads * d]),
        )
    }
    fn float_from_bytes<const D: usize>(
        bytes: &[u8],
        dtype: DType,
        shape: [usize; D],
        device: &Self::Device,
    ) -> Tensor<Self, D> {
        match dtype {
            // Straight from the checkpoint's mapping to the device (`crate::driver::copy_in`).
            DType::BF16 if !bytes.is_empty() => {
                from_cube(upload(device, bytes, shape.to_vec(), dtype))
            }
            // f32 and f16 checkpoints (Gemma-2's hub repo is f32) go up as stored and are
            // rounded to bf16 on the device, as the host would round them (to nearest even).
            // Through the host (a copy of the bytes, Burn's conversion, its upload) the
            // float tensors took 6.2 s of a Gemma-2-2b load (docs/benchmarks.md, run 23): fresh
            // host pages are written at ~0.5 GB/s on the device machine.
            DType::F32 | DType::F16 if !bytes.is_empty() => {
                from_cube::<D>(upload(device, bytes, shape.to_vec(), dtype))
                    .cast(burn_tensor::FloatDType::BF16)
            }
            _ => crate::backend::host_float_tensor(bytes, dtype, shape, device),
        }
    }
    fn release_device(device: &Self::Device) {
        crate::driver::release(device);
    }
    fn current_stream() -> u64 {
        cubecl::stream_id::StreamId::current().value
    }
    fn on_stream<T>(stream: u64, f: impl FnOnce() -> T) -> T {
        cubecl::stream_id::StreamId { value: stream }.executes(f)
    }
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
        Box::new(CudaNf4Linear::new_queued(weight, bias, device))
    }
    fn finish_uploads(_device: &Self::Device) -> crate::error::Result<()> {
        crate::driver::finish_uploads().map_err(crate::error::CoreError::internal)
    }
    /// One GEMV launch for all of q/k/v (3 launches -> 1 per layer at decode). The outputs
    /// are blocks of one buffer, each aligned as CubeCL aligns sub-buffers, handed out as
    /// contiguous tensors.
    fn linears_stacked(
        x: &Tensor<Self, 2>,
        linears: &[&dyn Linear<Self>],
    ) -> Option<Vec<Tensor<Self, 2>>> {
        let [tokens, k] = x.dims();
        let n = linears.iter().map(|l| l.out_features()).sum();
        let Some(cfg) = fused_config(tokens, n, k) else {
            // Prefill: the projections' GEMMs in one cuBLAS call group.
            return prefill_gemms(x, &nf4_layers(k, linears)?);
        };
        let group = nf4_group(k, linears)?;
        let last = group.len() - 1;
        let sizes: Vec<usize> = group.iter().map(|w| w.out_features).collect();
        let cfg = cfg.fitted(&sizes, k, false);
        // The MMA kernel's cubes shrink to 8 rows where they must (`launch_gemv`).
        let unit = if cfg.kernel == GemvKernel::Mma {
            8
        } else {
            cfg.rows
        };
        if !group[..last]
            .iter()
            .all(|w| w.out_features.is_multiple_of(unit))
        {
            return None;
        }
        let x = contiguous(x);
        let (starts, end) = sub_buffers(&x, group.iter().map(|w| tokens * w.out_features));
        let mut bases = [0usize; 3];
        bases[..starts.len()].copy_from_slice(&starts);
        let out = empty_like(&x, vec![end]);
        launch_gemv(x, &group, out.clone(), bases, cfg, None);
        Some(
            group
                .iter()
                .zip(starts)
                .map(|(w, at)| from_cube(sub_tensor(&out, at, vec![tokens, w.out_features])))
                .collect(),
        )
    }
    /// Gate and up in one GEMV launch with the activation and product in its epilogue
    /// (3 launches -> 1 per layer at decode).
    fn gated_linears(
        x: &Tensor<Self, 2>,
        gate: &dyn Linear<Self>,
        up: &dyn Linear<Self>,
        act: Activation,
    ) -> Option<Tensor<Self, 2>> {
        let [tokens, k] = x.dims();
        let Some(cfg) = fused_config(tokens, gate.out_features(), k) else {
            // Prefill: both GEMMs in one cuBLAS call group, then the activation.
            let mut gu = prefill_gemms(x, &nf4_layers(k, &[gate, up])?)?;
            let up = gu.pop()?;
            return Some(Self::gated_act(gu.pop()?, up, act));
        };
        let group = nf4_group(k, &[gate, up])?;
        if group[0].out_features != group[1].out_features {
            return None;
        }
        let x = contiguous(x);
        let out = empty_like(&x, vec![tokens, group[0].out_features]);
        launch_gemv(x, &group, out.clone(), [0; 3], cfg, Some(act));
        Some(from_cube(out))
    }
    fn rms_norm(x: Tensor<Self, 2>, norm: &RmsNorm<Self>) -> Tensor<Self, 2> {
        let [rows, hidden] = x.dims();
        let x = contiguous_owned(x);
        let w = contiguous(&norm.weight);
        let out = empty_like(&x, vec![rows, hidden]);
        let planes = norm_planes(hidden);
        // SAFETY: cube `r < rows` reads row `r` of `x` and writes row `r` of `out` (both
        // `[rows, hidden]` contiguous) and reads `w[0..hidden]`; at most MAX_PLANES planes
        // write `partial`.
        unsafe {
            rms_norm::launch_unchecked::<CudaRuntime>(
                &x.client.clone(),
                CubeCount::Static(rows as u32, 1, 1),
                CubeDim::new_2d(32, planes),
                x.clone().into_array_arg(),
                w.into_array_arg(),
                out.clone().into_array_arg(),
                hidden as u32,
                norm.eps as f32,
                norm.unit_offset,
                x.dtype.into(),
            );
        }
        from_cube(out)
    }
    fn add_rms_norm(
        x: Tensor<Self, 2>,
        delta: Tensor<Self, 2>,
        norm: &RmsNorm<Self>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        let [rows, hidden] = x.dims();
        assert_eq!([rows, hidden], delta.dims(), "residual shapes");
        let x = contiguous_owned(x);
        let r = contiguous_owned(delta);
        let w = contiguous(&norm.weight);
        let sum = empty_like(&x, vec![rows, hidden]);
        let out = empty_like(&x, vec![rows, hidden]);
        let planes = norm_planes(hidden);
        // SAFETY: as `rms_norm`, with `r` read and `sum` written at the indices of `x`.
        unsafe {
            add_rms_norm::launch_unchecked::<CudaRuntime>(
                &x.client.clone(),
                CubeCount::Static(rows as u32, 1, 1),
                CubeDim::new_2d(32, planes),
                x.clone().into_array_arg(),
                r.into_array_arg(),
                w.into_array_arg(),
                sum.clone().into_array_arg(),
                out.clone().into_array_arg(),
                hidden as u32,
                norm.eps as f32,
                norm.unit_offset,
                x.dtype.into(),
            );
        }
        (from_cube(sum), from_cube(out))
    }
    fn rope(x: Tensor<Self, 2>, heads: usize, tables: &RopeTables<Self>) -> Tensor<Self, 3> {
        let [rows, width] = x.dims();
        let d = width / heads;
        let x = contiguous_owned(x);
        let (cos, sin) = rope_tables(tables, rows, d);
        let out = empty_like(&x, vec![heads, rows, d]);
        let units = (rows * heads * d / 2) as u32;
        // SAFETY: unit `u < rows * heads * d / 2` reads elements of row `r < rows` of `x`
        // (`[rows, heads * d]` contiguous), `cos`/`sin` (`[rows, d]`, checked) and writes two
        // elements of `out` (`[heads, rows, d]`).
        unsafe {
            rope::launch_unchecked::<CudaRuntime>(
                &x.client.clone(),
                CubeCount::Static(units.div_ceil(256), 1, 1),
                CubeDim::new_1d(256),
                x.clone().into_array_arg(),
                cos.into_array_arg(),
                sin.into_array_arg(),
                out.clone().into_array_arg(),
                rows as u32,
                heads as u32,
                d as u32,
                x.dtype.into(),
            );
        }
        from_cube(out)
    }
    fn gated_act(gate: Tensor<Self, 2>, up: Tensor<Self, 2>, act: Activation) -> Tensor<Self, 2> {
        let dims = gate.dims();
        assert_eq!(dims, up.dims(), "gate and up shapes");
        let gate = contiguous_owned(gate);
        let up = contiguous_owned(up);
        let out = empty_like(&gate, dims.to_vec());
        let n = (dims[0] * dims[1]) as u32;
        // SAFETY: unit `i < n` reads element `i` of `gate` and `up` and writes element `i` of
        // `out`, all `n` elements contiguous.
        unsafe {
            gated_act::launch_unchecked::<CudaRuntime>(
                &gate.client.clone(),
                CubeCount::Static(n.div_ceil(256), 1, 1),
                CubeDim::new_1d(256),
                gate.clone().into_array_arg(),
                up.into_array_arg(),
                out.clone().into_array_arg(),
                n,
                act == Activation::GeluTanh,
                gate.dtype.into(),
            );
        }
        from_cube(out)
    }
    /// The cache grows by copying into a larger buffer (by half its size at least, in
    /// [`KV_CHUNK`] steps); a decode step then writes its one position in place with k's rope
    /// in the same kernel, where concatenation copied the whole cache twice per layer.
    fn kv_append(
        past: Option<LayerKv<Self>>,
        k: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        kv_heads: usize,
        tables: &RopeTables<Self>,
    ) -> LayerKv<Self> {
        let [rows, width] = k.dims();
        let d = width / kv_heads;
        let start = past.as_ref().map_or(0, |p| p.len);
        let len = start + rows;
        let (k_cache, v_cache, pool) = match past {
            Some(p) if p.capacity() >= len => (p.k, p.v, p.pool),
            past => {
                let old = past.as_ref().map_or(0, |p| p.capacity());
                let cap = len.max(old + old / 2).next_multiple_of(KV_CHUNK);
                let device = k.device();
                // Strictly contiguous: the kernels index the caches as flat `[kv_heads, cap, d]`
                // and write them in place. Burn's `empty` pads rows to CubeCL's pitch when
                // `d * 2` bytes is not a power of two (Phi-3's head dim 96: 192 -> 256 bytes),
                // and `contiguous` below would then write a copy.
                let grow = |filled: Option<Tensor<Self, 3>>| {
                    let fresh = from_cube(empty_device_contiguous_dtype(
                        CudaRuntime::client(&device),
                        device.clone(),
                        Shape::from(vec![kv_heads, cap, d]),
                        DType::BF16,
                    ));
                    let t: Tensor<Self, 3> = match filled {
                        Some(t) => fresh.slice_assign([0..kv_heads, 0..start, 0..d], t),
                        None => fresh,
                    };
                    from_cube(contiguous_owned(t))
                };
                let (pk, pv) = match past {
                    Some(p) => (Some(p.keys()), Some(p.values())),
                    None => (None, None),
                };
                (grow(pk), grow(pv), None)
            }
        };
        let cap = k_cache.dims()[1];
        let (cos, sin) = rope_tables(tables, rows, d);
        let k = contiguous_owned(k);
        let v = contiguous_owned(v);
        let units = (rows * kv_heads * d / 2) as u32;
        // SAFETY: unit `u < rows * kv_heads * d / 2` reads elements of row `r < rows` of `k`
        // and `v` (`[rows, kv_heads * d]` contiguous) and of `cos`/`sin` (`[rows, d]`,
        // checked), and writes positions `start + r < cap` of the caches (`[kv_heads, cap, d]`
        // contiguous, `cap >= start + rows` by construction above).
        unsafe {
            kv_append::launch_unchecked::<CudaRuntime>(
                &k.client.clone(),
                CubeCount::Static(units.div_ceil(256), 1, 1),
                CubeDim::new_1d(256),
                k.clone().into_array_arg(),
                v.into_array_arg(),
                cos.into_array_arg(),
                sin.into_array_arg(),
                contiguous(&k_cache).into_array_arg(),
                contiguous(&v_cache).into_array_arg(),
                rows as u32,
                kv_heads as u32,
                d as u32,
                cap as u32,
                start as u32,
                k.dtype.into(),
            );
        }
        LayerKv {
            k: k_cache,
            v: v_cache,
            len,
            pool,
        }
    }
    fn decode_attention(
        q: &Tensor<Self, 3>,
        kv: &LayerKv<Self>,
        cfg: &AttentionConfig,
    ) -> Option<Tensor<Self, 2>> {
        let [heads, rows, d] = q.dims();
        let [kv_heads, cap, _] = kv.k.dims();
        let t_len = kv.len;
        // The kernel splits the head dim over a plane of 32 (head dims 32..256 in steps of 32).
        if rows != 1 || !d.is_multiple_of(32) || d / 32 > 8 || heads % kv_heads != 0 {
            return None;
        }
        let t_start = cfg.sliding_window.map_or(0, |w| t_len.saturating_sub(w));
        let q = contiguous(q);
        let k = contiguous(&kv.k);
        let v = contiguous(&kv.v);
        let out = empty_like(&q, vec![1, heads * d]);
        const PLANES: usize = 8;
        // SAFETY: cube `h < heads` reads row `h` of `q` (`[heads, d]` contiguous), rows
        // `t_start..t_len` of kv head `h / groups` of `k` and `v` (`[kv_heads, cap, d]`
        // contiguous, `t_len <= cap`, `heads = groups * kv_heads`), writes row `h` of `out`;
        // shared memory is sized by the comptime plane count the cube is launched with.
        unsafe {
            decode_attention::launch_unchecked::<CudaRuntime>(
                &q.client.clone(),
                CubeCount::Static(heads as u32, 1, 1),
                CubeDim::new_2d(32, PLANES as u32),
                q.clone().into_array_arg(),
                k.into_array_arg(),
                v.into_array_arg(),
                out.clone().into_array_arg(),
                t_len as u32,
                cap as u32,
                t_start as u32,
                (heads / kv_heads) as u32,
                cfg.scale as f32,
                cfg.softcap.unwrap_or(0.0) as f32,
                d / 32,
                PLANES,
                q.dtype.into(),
            );
        }
        Some(from_cube(out))
    }
}

/// The rope tables as the rope kernels index them: `cos`, `sin` contiguous, checked to be
/// `[rows, d]` (the kernels read them unchecked).
fn rope_tables(
    tables: &RopeTables<CudaBf16>,
    rows: usize,
    d: usize,
) -> (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>) {
    let cos = contiguous(&tables.cos);
    let sin = contiguous(&tables.sin);
    for t in [&cos, &sin] {
        let shape = t.meta.shape();
        assert!(
            shape[0] == rows && shape[1] == d,
            "rope tables: {shape:?}, want [{rows}, {d}]"
        );
    }
    (cos, sin)
}

/// Planes per cube of the RMSNorm kernels: about 4 elements per unit, at most MAX_PLANES.
fn norm_planes(hidden: usize) -> u32 {
    (hidden / 32 / 4).clamp(1, MAX_PLANES) as u32
}

/// A Burn tensor's CubeCL tensor, contiguous (a copy only if it was a strided view), for the
/// kernels here, which index their inputs as dense row-major arrays.
fn contiguous_owned<const D: usize>(t: Tensor<CudaBf16, D>) -> CubeTensor<CudaRuntime> {
    into_contiguous(t.into_primitive().tensor())
}

/// [`contiguous_owned`] of a borrowed tensor (a handle clone, no data copy).
fn contiguous<const D: usize>(t: &Tensor<CudaBf16, D>) -> CubeTensor<CudaRuntime> {
    contiguous_owned(t.clone())
}

/// A kernel's output as a Burn tensor.
fn from_cube<const D: usize>(t: CubeTensor<CudaRuntime>) -> Tensor<CudaBf16, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// An uninitialised contiguous tensor of `shape` on `like`'s device, in its dtype. Strictly
/// contiguous, as the kernels index their outputs: CubeCL's default ("optimized") layout pads
/// each row to a pitch when its byte width is not a power of two (e.g. 576 bf16: 1152 -> 1536
/// bytes), which `from_cube` would then read with gaps the kernels never wrote.
fn empty_like(like: &CubeTensor<CudaRuntime>, shape: Vec<usize>) -> CubeTensor<CudaRuntime> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        like.dtype,
    )
}
