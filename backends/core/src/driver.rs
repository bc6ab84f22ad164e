//! The CUDA driver and cuBLAS beside CubeCL, on the same primary context: host-to-device
//! copies for loads ([`copy_in`]) and, on request, bf16 GEMMs through cuBLAS for prefill-sized
//! NF4 linears ([`linears`]).
//!
//! cuBLAS is opt-in (`LLM_CUDA_GEMM=cublas`): dequantize, then `cublasGemmEx` (bf16 in and
//! out, f32 accumulation), as bitsandbytes' `matmul_4bit` does through `torch.nn.functional
//! .linear` past one row. Alone its GEMMs beat Burn's matmul (512 rows: 205-382 TFLOPS against
//! 60-200; the 8B linears 33.1 ms against 50.1), but CubeCL does not hand out its CUDA stream,
//! so the two meet at host synchronisations: wait for the device (the inputs are written),
//! enqueue the GEMMs on our own stream, wait for that stream before CubeCL's next kernel reads
//! the outputs. That stalls the host's run-ahead at every projection group, and in the server
//! the 8B's 512-token TTFT went from 60.1 to 79.4 ms, 32 tokens from 33.7 to 38.3 ms, and
//! loading cuBLAS's kernels cost ~590 MB of device memory that an unload does not return
//! (docs/benchmarks.md, run 14). Worth turning on by default once the GEMMs can be ordered on
//! CubeCL's stream. Without the library (`libcublas.so.13` on the loader path) it stays off.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use burn_cubecl::cubecl::client::ComputeClient;
use burn_cubecl::cubecl::cuda::{CudaDevice, CudaRuntime};
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::tensor::CubeTensor;
use burn_tensor::DType;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaStream};

/// Whether prefill GEMMs go to cuBLAS when it loads (set from `LLM_CUDA_GEMM` at each CUDA
/// load, [`crate::cuda::read_env`]); off (the default, module doc), Burn's matmul.
pub static USE_CUBLAS: AtomicBool = AtomicBool::new(false);

/// A cuBLAS handle on its own stream, per device.
struct Blas {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

/// The device's primary context (the one CubeCL uses), retained once per device.
fn context(ordinal: usize) -> Option<Arc<CudaContext>> {
    static CONTEXTS: OnceLock<Mutex<HashMap<usize, Arc<CudaContext>>>> = OnceLock::new();
    let mut map = CONTEXTS.get_or_init(Default::default).lock().ok()?;
    if let Some(ctx) = map.get(&ordinal) {
        return Some(ctx.clone());
    }
    let ctx = CudaContext::new(ordinal).ok()?;
    map.insert(ordinal, ctx.clone());
    Some(ctx)
}

/// A new device buffer holding `bytes`, copied by the driver straight from `bytes` (a file
/// mapping or a reused host buffer), or `None` if a driver call failed.
///
/// Why not CubeCL's `create_from_slice`: it copies the bytes into its pinned staging pool
/// first, and Burn's `from_data` wants them in an owned `Vec`; on the device machine fresh host
/// pages are written at ~0.5 GB/s (docs/benchmarks.md, run 14), which made those copies most of
/// a load's upload time. The driver stages pageable memory through buffers of its own.
pub fn copy_in(
    client: &ComputeClient<CudaRuntime>,
    device: &CudaDevice,
    bytes: &[u8],
) -> Option<Handle> {
    let handle = client.empty(bytes.len());
    // A round trip through CubeCL's server thread: the allocation is made.
    let resource = client.get_resource(handle.clone()).ok()?;
    let ctx = context(device.index)?;
    ctx.bind_to_thread().ok()?;
    // The allocation may be stream-ordered on CubeCL's stream: wait for it. After the copy,
    // wait again: a pageable copy returns once the bytes are staged, before the DMA ends, and
    // CubeCL's kernels run on a stream the copy does not order against.
    ctx.synchronize().ok()?;
    // SAFETY: the destination is a live allocation of `bytes.len()` bytes, kept alive by
    // `resource` until the copy and the context sync after it are done.
    unsafe { cudarc::driver::result::memcpy_htod_sync(resource.resource().ptr, bytes) }.ok()?;
    ctx.synchronize().ok()?;
    drop(resource);
    Some(handle)
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

/// One GEMM of [`linears`]: `out[m, n] = x[m, k] · w[n, k]^T`, its weight `[n, k]` from
/// element `w_at` of the weight buffer and its output `[m, n]` from element `out_at` of the
/// output buffer (both bf16, row-major).
pub struct Part {
    pub n: usize,
    pub w_at: usize,
    pub out_at: usize,
}

/// Run `parts` (each against the same `x` `[m, k]`) on cuBLAS between one pair of host waits
/// (module doc). The weights share one buffer and the outputs another, so the device
/// addresses cost three round trips to CubeCL's server thread, whatever the group's size.
/// Returns false, having done nothing, when cuBLAS is not [`available`] or a call fails (the
/// caller falls back).
///
/// In column-major terms (cuBLAS's) a row-major `[r, c]` matrix is its `[c, r]` transpose, so
/// `out^T [n, m] = w [n, k] · x^T [k, m]` is `gemm(op(A) = T, op(B) = N)` with `A` = `w` as a
/// column-major `[k, n]`, `B` = `x` as `[k, m]`: the "TN" layout, cuBLAS's fastest for bf16.
pub fn linears(
    x: &CubeTensor<CudaRuntime>,
    w: &CubeTensor<CudaRuntime>,
    out: &CubeTensor<CudaRuntime>,
    parts: &[Part],
) -> bool {
    if parts.is_empty() || !available() {
        return false;
    }
    let [m, k] = [x.meta.shape()[0], x.meta.shape()[1]];
    assert!(
        [x, w, out]
            .iter()
            .all(|t| t.dtype == DType::BF16 && t.is_contiguous()),
        "cuBLAS GEMM operands are contiguous bf16"
    );
    assert_eq!(x.meta.shape().len(), 2, "x is [m, k]");
    let (w_len, out_len) = (
        w.meta.shape().num_elements(),
        out.meta.shape().num_elements(),
    );
    for p in parts {
        assert!(
            p.w_at + p.n * k <= w_len && p.out_at + m * p.n <= out_len,
            "GEMM part past its buffer"
        );
    }
    let client = x.client.clone();
    let device = x.device.clone();
    // Device addresses. Each `get_resource` is a round trip through CubeCL's server thread,
    // queued after every launch this thread made, so once they return those launches are on
    // the device's queue; the managed resources keep the allocations alive until we return.
    let mut keep = Vec::with_capacity(3);
    let mut base = [0u64; 3];
    for (slot, t) in base.iter_mut().zip([x, w, out]) {
        let Ok(r) = client.get_resource(t.handle.clone()) else {
            return false;
        };
        *slot = r.resource().ptr;
        keep.push(r);
    }
    let [x_ptr, w_ptr, out_ptr] = base;
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
    // Every operand written, every earlier reader of `out`'s memory done: the whole context
    // idle (CubeCL's stream cannot be waited on alone, it is not handed out).
    if blas.ctx.synchronize().is_err() {
        return false;
    }
    let (one, zero) = (1.0f32, 0.0f32);
    let bf16 = 2u64;
    for p in parts {
        // SAFETY: the pointers are live device allocations holding the stated bf16 ranges
        // (checked above), the handle's stream is ours, and we wait for it before the
        // resources drop.
        let status = unsafe {
            blas::gemm_ex(
                *blas.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                p.n as i32,
                m as i32,
                k as i32,
                (&one as *const f32).cast(),
                (w_ptr + bf16 * p.w_at as u64) as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x_ptr as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                (&zero as *const f32).cast(),
                (out_ptr + bf16 * p.out_at as u64) as *mut std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                p.n as i32,
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
    let ctx = context(ordinal)?;
    let stream = ctx.new_stream().ok()?;
    let blas = CudaBlas::new(stream.clone()).ok()?;
    Some(Blas { blas, stream, ctx })
}
