//! bf16 GEMMs through cuBLAS for prefill-sized NF4 linears (dequantize, then multiply), as
//! bitsandbytes does: `matmul_4bit` with more than one row dequantizes the weight and calls
//! `torch.nn.functional.linear`, which is `cublasGemmEx` (bf16 in and out, f32 accumulation).
//!
//! Why not Burn's matmul: on an H200 it ran the 512-row prefill GEMMs of an 8B model at
//! 60-200 TFLOPS (docs/benchmarks.md, run 13; the card's dense bf16 peak is ~990), which made
//! the linears 49 of the 60 ms to the first token.
//!
//! CubeCL does not hand out its CUDA stream, so the two meet at host synchronisations: wait
//! for CubeCL's stream (the inputs are written), enqueue the GEMMs on our own stream, wait for
//! that stream (the outputs are written) before CubeCL's next kernel reads them. Callers batch
//! the GEMMs of a layer's projections between one pair of waits.
//!
//! cuBLAS is loaded at run time (cudarc's dynamic loading: `libcublas.so` / `libcublas.so.13`
//! on the loader path). Without it, or with `LLM_CUDA_GEMM=burn`, prefill keeps Burn's matmul.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use burn_cubecl::cubecl::cuda::{CudaDevice, CudaRuntime};
use burn_cubecl::tensor::CubeTensor;
use burn_tensor::DType;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaStream};

/// Whether prefill GEMMs go to cuBLAS when it loads (set from `LLM_CUDA_GEMM` at each CUDA
/// load, [`crate::cuda::read_env`]); off, Burn's matmul.
pub static USE_CUBLAS: AtomicBool = AtomicBool::new(true);

/// A cuBLAS handle on its own stream, per device.
struct Blas {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

/// Handles by device ordinal, created at first use and dropped by [`release`] when a model
/// leaves the device (so an unload hands cuBLAS's workspace back too).
fn handles() -> &'static Mutex<HashMap<usize, Blas>> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Blas>>> = OnceLock::new();
    HANDLES.get_or_init(Default::default)
}

/// Whether the cuBLAS library can be loaded (probed once per process).
fn library_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries `dlopen` on the candidate names.
    *PRESENT.get_or_init(|| unsafe { blas_sys::is_culib_present() })
}

/// Whether [`linears`] will run (cuBLAS is wanted and present).
pub fn available() -> bool {
    USE_CUBLAS.load(Ordering::Relaxed) && library_present()
}

/// Drop `device`'s handle and stream (a model was unloaded); the next GEMM makes new ones.
pub fn release(device: &CudaDevice) {
    if let Ok(mut h) = handles().lock() {
        h.remove(&device.index);
    }
}

/// One GEMM of [`linears`]: `out[m, n] = x[m, k] · w[n, k]^T`, all three contiguous bf16.
pub struct Gemm<'a> {
    pub x: &'a CubeTensor<CudaRuntime>,
    pub w: &'a CubeTensor<CudaRuntime>,
    pub out: &'a CubeTensor<CudaRuntime>,
}

/// Run `gemms` on cuBLAS between one pair of host waits (module doc). Returns false, having
/// done nothing, when cuBLAS is not [`available`] or a call fails (the caller falls back).
///
/// In column-major terms (cuBLAS's) a row-major `[r, c]` matrix is its `[c, r]` transpose, so
/// `out^T [n, m] = w [n, k] · x^T [k, m]` is `gemm(op(A) = T, op(B) = N)` with `A` = `w` as a
/// column-major `[k, n]`, `B` = `x` as `[k, m]`: the "TN" layout, cuBLAS's fastest for bf16.
pub fn linears(gemms: &[Gemm<'_>]) -> bool {
    if gemms.is_empty() || !available() {
        return false;
    }
    for g in gemms {
        let (xs, ws, os) = (g.x.meta.shape(), g.w.meta.shape(), g.out.meta.shape());
        assert!(
            xs.len() == 2 && ws.len() == 2 && os.len() == 2,
            "cuBLAS GEMM operands are matrices"
        );
        assert!(
            xs[1] == ws[1] && os[0] == xs[0] && os[1] == ws[0],
            "GEMM shapes: x {xs:?}, w {ws:?}, out {os:?}"
        );
        assert!(
            [g.x, g.w, g.out]
                .iter()
                .all(|t| t.dtype == DType::BF16 && t.is_contiguous()),
            "cuBLAS GEMM operands are contiguous bf16"
        );
    }
    let client = gemms[0].x.client.clone();
    let device = gemms[0].x.device.clone();
    // Every operand written (and every earlier reader of `out`'s memory done).
    if burn_cubecl::cubecl::future::block_on(client.sync()).is_err() {
        return false;
    }
    // Device addresses; the managed resources keep the allocations alive until we return.
    let mut keep = Vec::with_capacity(3 * gemms.len());
    let mut ptrs = Vec::with_capacity(gemms.len());
    for g in gemms {
        let mut p = [0u64; 3];
        for (slot, t) in p.iter_mut().zip([g.x, g.w, g.out]) {
            let Ok(r) = client.get_resource(t.handle.clone()) else {
                return false;
            };
            *slot = r.resource().ptr;
            keep.push(r);
        }
        ptrs.push(p);
    }
    let Ok(mut handles) = handles().lock() else {
        return false;
    };
    let blas = match handles.entry(device.index) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => match new_handle(device.index) {
            Some(b) => e.insert(b),
            None => return false,
        },
    };
    if blas.ctx.bind_to_thread().is_err() {
        return false;
    }
    let (one, zero) = (1.0f32, 0.0f32);
    for (g, &[x, w, out]) in gemms.iter().zip(&ptrs) {
        let (m, k) = (g.x.meta.shape()[0], g.x.meta.shape()[1]);
        let n = g.w.meta.shape()[0];
        // SAFETY: the pointers are live device allocations of the stated bf16 shapes (checked
        // above), the handle's stream is ours, and we wait for it before the resources drop.
        let status = unsafe {
            blas::gemm_ex(
                *blas.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&one as *const f32).cast(),
                w as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                (&zero as *const f32).cast(),
                out as *mut std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if status.is_err() {
            // Nothing half-written is read: the caller recomputes every output.
            let _ = blas.stream.synchronize();
            return false;
        }
    }
    let done = blas.stream.synchronize().is_ok();
    drop(keep);
    done
}

fn new_handle(ordinal: usize) -> Option<Blas> {
    let ctx = CudaContext::new(ordinal).ok()?;
    let stream = ctx.new_stream().ok()?;
    let blas = CudaBlas::new(stream.clone()).ok()?;
    Some(Blas { blas, stream, ctx })
}
