//! The CUDA driver and cuBLAS beside CubeCL, on the same primary context: host-to-device
//! copies for loads ([`copy_in`]) and, on request, bf16 GEMMs through cuBLAS for prefill-sized
//! NF4 linears ([`linears`]).
//!
//! cuBLAS is opt-in (`LLM_CUDA_GEMM=cublas`): dequantize, then `cublasGemmEx` (bf16 in and
//! out, f32 accumulation), as bitsandbytes' `matmul_4bit` does through `torch.nn.functional
//! .linear` past one row. Alone its GEMMs beat Burn's matmul (512 rows: 205-382 TFLOPS against
//! 60-200; the 8B linears 33.1 ms against 50.1). CubeCL does not hand out its CUDA stream, so
//! the two streams meet at two flag words in device memory instead of host waits (those
//! stalled the host's run-ahead at every projection group: the 8B's 512-token TTFT went from
//! 60.1 to 79.4 ms in run 14): a one-thread CubeCL kernel stores `v` into the first word
//! after every kernel before it on CubeCL's stream, cuBLAS's stream waits for that value
//! (`cuStreamWaitValue32`), runs the GEMMs and writes `v` into the second word
//! (`cuStreamWriteValue32`), and a one-thread CubeCL kernel spins on that word before
//! anything after it on CubeCL's stream runs. On the H200 of run 18 (driver 580) the driver
//! refused the wait (`CUDA_ERROR_INVALID_VALUE`, on a word of CubeCL's pool), so the process
//! falls back to run 14's host waits (the whole context idle before the GEMMs, cuBLAS's stream
//! after them) and says so on stderr once; why it refused is not found yet. Loading cuBLAS's
//! kernels costs ~590 MB of device memory that an unload does not return (docs/benchmarks.md,
//! run 14). Without the library (`libcublas.so.13` on the loader path) it stays off.

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

/// Whether the GEMMs are ordered by the flag words (module doc); off for the process once the
/// driver refuses a wait on them, and the GEMMs fall back to host waits.
static STREAM_FLAGS: AtomicBool = AtomicBool::new(true);

/// A cuBLAS handle on its own stream, per device, and the flag words ordering it against each
/// CubeCL stream that called it (module doc), by CubeCL stream id.
struct Blas {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    flags: HashMap<u64, Flags>,
}

/// Two `u32` words: `[to_blas, from_blas]`, and the value the last call wrote. Per CubeCL
/// stream: a value written by one stream's kernel must not release another stream's GEMMs.
struct Flags {
    /// Keeps the words allocated (CubeCL's pool never moves an allocation).
    handle: Handle,
    ptr: u64,
    count: u32,
}

/// The one-thread kernels at either side of the GEMMs on CubeCL's stream (module doc).
mod flag_kernels {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    /// `flags[0] = value`: every kernel before it on the stream is done.
    #[cube(launch_unchecked)]
    pub fn flag_store(flags: &mut Array<Atomic<u32>>, value: u32) {
        if UNIT_POS == 0 {
            flags[0].store(value);
        }
    }

    /// Spin until `flags[1] == value` (cuBLAS's stream wrote it after its GEMMs). Equality,
    /// not order: the word cannot move past `value` before this kernel ends (the next
    /// `flag_store` comes after it on this stream, and the next write after that), so it
    /// survives the counter wrapping.
    #[cube(launch_unchecked)]
    pub fn flag_wait(flags: &Array<Atomic<u32>>, value: u32) {
        if UNIT_POS == 0 {
            while flags[1].load() != value {}
        }
    }
}

/// Launch a flag kernel on the calling thread's CubeCL stream.
fn launch_flag(client: &ComputeClient<CudaRuntime>, flags: &Handle, value: u32, store: bool) {
    use burn_cubecl::cubecl::prelude::{ArrayArg, CubeCount, CubeDim};
    // SAFETY: `flags` is a live 2-word allocation; each kernel touches word 0 or 1 only.
    unsafe {
        let arg = ArrayArg::from_raw_parts(flags.clone(), 2);
        let (count, dim) = (CubeCount::Static(1, 1, 1), CubeDim::new_1d(1));
        if store {
            flag_kernels::flag_store::launch_unchecked::<CudaRuntime>(
                client, count, dim, arg, value,
            );
        } else {
            flag_kernels::flag_wait::launch_unchecked::<CudaRuntime>(
                client, count, dim, arg, value,
            );
        }
    }
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

/// Run `parts` (each against the same `x` `[m, k]`) on cuBLAS, ordered on the calling thread's
/// CubeCL stream by the flag words (module doc; host waits where the driver refuses them). The
/// weights share one buffer
/// and the outputs another, so the device addresses cost three round trips to CubeCL's server
/// thread, whatever the group's size. Returns false when cuBLAS is not [`available`] or a call
/// fails (the caller falls back to Burn's matmul, which CubeCL's stream runs after whatever
/// was enqueued here).
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
    use cudarc::driver::sys;
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
    let Ok(mut handles) = handles().lock() else {
        return false;
    };
    let blas = match handles.entry(device.index) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => match new_handle(device.index) {
            Some(b) => e.insert(b),
            None => return give_up("no cuBLAS handle"),
        },
    };
    // Device addresses. Each `get_resource` is a round trip through CubeCL's server thread;
    // the managed resources keep the allocations alive until we return.
    let mut keep = Vec::with_capacity(3);
    let mut base = [0u64; 3];
    for (slot, t) in base.iter_mut().zip([x, w, out]) {
        let Ok(r) = client.get_resource(t.handle.clone()) else {
            return give_up("an operand's address");
        };
        *slot = r.resource().ptr;
        keep.push(r);
    }
    // The first flag word, after every kernel this stream has queued (the dequantize writing
    // `w`, whatever wrote `x`, every earlier reader of `out`'s memory).
    let flag = if STREAM_FLAGS.load(Ordering::Relaxed) {
        let stream_id = burn_cubecl::cubecl::stream_id::StreamId::current().value;
        let flags = match blas.flags.entry(stream_id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                // Pool memory holds stale values until CubeCL's stream writes the zeros: wait
                // for them once, so no stale word can match a value or be overwritten later.
                let handle = client.create_from_slice(&[0u8; 8]);
                let Ok(r) = client.get_resource(handle.clone()) else {
                    return give_up("the flag words' address");
                };
                if blas.ctx.synchronize().is_err() {
                    return give_up("zeroing the flag words");
                }
                let ptr = r.resource().ptr;
                e.insert(Flags {
                    handle,
                    ptr,
                    count: 0,
                })
            }
        };
        flags.count = flags.count.wrapping_add(1);
        launch_flag(&client, &flags.handle, flags.count, true);
        Some((flags.handle.clone(), flags.ptr, flags.count))
    } else {
        None
    };
    let [x_ptr, w_ptr, out_ptr] = base;
    if let Err(e) = blas.ctx.bind_to_thread() {
        return give_up(&format!("binding the context: {e:?}"));
    }
    let cu_stream = blas.stream.cu_stream();
    let flag = flag.filter(|&(_, ptr, v)| {
        // SAFETY: the flag word is a live allocation (held by `blas.flags`), the stream ours.
        let waits = unsafe {
            sys::cuStreamWaitValue32_v2(
                cu_stream,
                ptr,
                v,
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_EQ as u32,
            )
        };
        if waits != sys::CUresult::CUDA_SUCCESS && STREAM_FLAGS.swap(false, Ordering::Relaxed) {
            // The stored word is harmless; nothing was enqueued on our stream.
            eprintln!("cuBLAS GEMMs ordered by host waits: cuStreamWaitValue32: {waits:?}");
        }
        waits == sys::CUresult::CUDA_SUCCESS
    });
    // Without the flag words (run 18 on an H200: the driver refused the wait on CubeCL's
    // memory, CUDA_ERROR_INVALID_VALUE) the GEMMs wait for the whole context to be idle.
    if flag.is_none() && blas.ctx.synchronize().is_err() {
        return give_up("waiting for the device");
    }
    let (one, zero) = (1.0f32, 0.0f32);
    let bf16 = 2u64;
    let mut done = true;
    for p in parts {
        // SAFETY: the pointers are live device allocations holding the stated bf16 ranges
        // (checked above), the handle's stream is ours, and CubeCL's stream reuses none of
        // them before the second flag word (or the host wait below) says these GEMMs are done.
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
        if let Err(e) = status {
            // Nothing half-written is read: the caller recomputes every output.
            done = give_up(&format!("cublasGemmEx: {e:?}"));
            break;
        }
    }
    let Some((flags, ptr, v)) = flag else {
        done &= blas.stream.synchronize().is_ok();
        drop(keep);
        return done;
    };
    // SAFETY: as for the wait above.
    let writes = unsafe {
        sys::cuStreamWriteValue32_v2(
            cu_stream,
            ptr + 4,
            v,
            sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
        )
    };
    if writes == sys::CUresult::CUDA_SUCCESS {
        launch_flag(&client, &flags, v, false);
    } else {
        // No word for CubeCL's stream to wait on: wait here instead.
        done &= blas.stream.synchronize().is_ok();
        done &= give_up(&format!("cuStreamWriteValue32: {writes:?}"));
    }
    drop(keep);
    done
}

/// A cuBLAS call or a stream operation failed: say why on stderr and leave cuBLAS off until
/// the next CUDA load reads `LLM_CUDA_GEMM` again (each failed call would otherwise repeat the
/// dequantize for nothing). Returns false, for the caller to fall back.
fn give_up(why: &str) -> bool {
    if USE_CUBLAS.swap(false, Ordering::Relaxed) {
        eprintln!("cuBLAS prefill GEMMs off: {why}");
    }
    false
}

fn new_handle(ordinal: usize) -> Option<Blas> {
    let ctx = context(ordinal)?;
    let stream = ctx.new_stream().ok()?;
    let blas = CudaBlas::new(stream.clone()).ok()?;
    Some(Blas {
        blas,
        stream,
        ctx,
        flags: HashMap::new(),
    })
}
