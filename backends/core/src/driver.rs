//! The CUDA driver and cuBLAS beside CubeCL, on the same primary context: host-to-device
//! copies for loads ([`copy_in`]) and bf16 GEMMs through cuBLAS for prefill-sized NF4 linears
//! ([`linears`]).
//!
//! cuBLAS is the default where it loads (`LLM_CUDA_GEMM=burn` turns it off,
//! [`crate::cuda::read_env`]): dequantize, then `cublasGemmEx` (bf16 in and out, f32
//! accumulation), as bitsandbytes' `matmul_4bit` does through `torch.nn.functional.linear` past
//! one row. Its GEMMs beat Burn's matmul: the 8B's prefill linears at 512 rows take 19.8 ms
//! against 49.1, its 512-token TTFT 42.7 ms against 59.7 (docs/benchmarks.md, runs 18-19). The
//! GEMMs must be ordered with CubeCL's
//! kernels (the dequantize before them, whatever reads their output after), and CubeCL does
//! not hand out its CUDA stream. So it is found once per CubeCL stream: CUPTI's callback on
//! `cuLaunchKernel` sees the stream argument of a probe kernel launched through CubeCL
//! ([`find_stream`]), and cuBLAS then runs on that very stream, in order with CubeCL's kernels
//! and with no wait at all. Where CUPTI is missing or refuses (one subscriber per process:
//! Nsight Compute's own) cuBLAS turns off, said once on stderr: host waits (the whole context
//! idle before the GEMMs, cuBLAS's own stream after them) stalled the host's run-ahead at
//! every projection group, slower than Burn's matmul (the 8B's 512-token TTFT went from 60.1
//! to 79.4 ms in run 14).
//! Run 18 tried flag words in device memory instead (`cuStreamWaitValue32` on cuBLAS's
//! stream): the H200's driver refused the wait on CubeCL's pool memory. Loading cuBLAS's
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
use cudarc::driver::CudaContext;

/// Whether prefill GEMMs go to cuBLAS when it loads (set from `LLM_CUDA_GEMM` at each CUDA
/// load, [`crate::cuda::read_env`]: on unless `LLM_CUDA_GEMM=burn`); off, Burn's matmul. Off
/// until a load reads it (llm-bench sets it itself).
pub static USE_CUBLAS: AtomicBool = AtomicBool::new(false);

/// A cuBLAS handle bound to one CubeCL stream's CUDA stream: one per device and CubeCL stream,
/// so that no two streams share a handle's workspace.
struct Blas {
    blas: CudaBlas,
    ctx: Arc<CudaContext>,
}

/// The name of the probe kernel whose launch [`find_stream`] watches.
const PROBE_NAME: &[u8] = b"llm_stream_probe";

/// The probe kernel whose launch [`find_stream`] watches.
mod probe_kernel {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    #[cube(launch_unchecked)]
    pub fn llm_stream_probe(out: &mut Array<u32>) {
        if UNIT_POS == 0 {
            out[0] = 1;
        }
    }
}

/// The stream argument of the last `llm_stream_probe` launch CUPTI reported.
static PROBED_STREAM: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The three CUPTI calls [`find_stream`] makes and the two structures its callback reads, as
/// `cupti_callbacks.h` and `cupti_driver_cbid.h` declare them (CUPTI 12-13).
mod cupti {
    use std::ffi::{c_char, c_void};

    pub type Subscriber = *mut c_void;
    pub type Callback = unsafe extern "C" fn(*mut c_void, u32, u32, *const c_void);
    pub const SUCCESS: i32 = 0;
    pub const DOMAIN_DRIVER_API: u32 = 1;
    pub const CBID_CU_LAUNCH_KERNEL: u32 = 307;
    pub const API_ENTER: u32 = 0;

    /// `CUpti_CallbackData`.
    #[repr(C)]
    pub struct CallbackData {
        pub callback_site: u32,
        pub function_name: *const c_char,
        pub function_params: *const c_void,
        pub function_return_value: *mut c_void,
        pub symbol_name: *const c_char,
        pub context: *mut c_void,
        pub context_uid: u32,
        pub correlation_data: *mut u64,
        pub correlation_id: u32,
    }

    /// `cuLaunchKernel_params`.
    #[repr(C)]
    pub struct LaunchKernelParams {
        pub f: *mut c_void,
        pub grid: [u32; 3],
        pub block: [u32; 3],
        pub shared_mem_bytes: u32,
        pub h_stream: *mut c_void,
        pub kernel_params: *mut *mut c_void,
        pub extra: *mut *mut c_void,
    }

    pub struct Api {
        _lib: libloading::Library,
        pub subscribe: unsafe extern "C" fn(*mut Subscriber, Callback, *mut c_void) -> i32,
        pub enable_callback: unsafe extern "C" fn(u32, Subscriber, u32, u32) -> i32,
        pub unsubscribe: unsafe extern "C" fn(Subscriber) -> i32,
    }

    /// `libcupti.so.13` on the loader path (PyTorch's CUDA 13 wheels put it beside cuBLAS),
    /// else the toolkit's `extras/CUPTI/lib64` under `$CUDA_HOME`, `$CUDA_PATH` or
    /// `/usr/local/cuda`; loaded once.
    pub fn api() -> Option<&'static Api> {
        static API: std::sync::OnceLock<Option<Api>> = std::sync::OnceLock::new();
        API.get_or_init(|| {
            // SAFETY: loading CUPTI runs no initializer of consequence; the symbols are CUPTI's
            // C functions with the signatures above.
            unsafe {
                let toolkit = ["CUDA_HOME", "CUDA_PATH"]
                    .iter()
                    .filter_map(|v| std::env::var(v).ok())
                    .chain(["/usr/local/cuda".to_string()])
                    .map(|root| format!("{root}/extras/CUPTI/lib64/libcupti.so.13"));
                let lib = ["libcupti.so.13".to_string(), "libcupti.so".to_string()]
                    .into_iter()
                    .chain(toolkit)
                    .find_map(|n| libloading::Library::new(n).ok())?;
                let subscribe = *lib.get(b"cuptiSubscribe\0").ok()?;
                let enable_callback = *lib.get(b"cuptiEnableCallback\0").ok()?;
                let unsubscribe = *lib.get(b"cuptiUnsubscribe\0").ok()?;
                Some(Api {
                    _lib: lib,
                    subscribe,
                    enable_callback,
                    unsubscribe,
                })
            }
        })
        .as_ref()
    }
}

/// CUPTI's driver-API callback while [`find_stream`] subscribes: on entry to a
/// `cuLaunchKernel` of the probe kernel, keep its stream.
unsafe extern "C" fn on_launch(
    _: *mut std::ffi::c_void,
    _domain: u32,
    cbid: u32,
    data: *const std::ffi::c_void,
) {
    if cbid != cupti::CBID_CU_LAUNCH_KERNEL || data.is_null() {
        return;
    }
    // SAFETY: for the driver domain CUPTI passes a `CUpti_CallbackData`, and for
    // `cuLaunchKernel` its `functionParams` are that call's parameters.
    unsafe {
        let data = &*(data as *const cupti::CallbackData);
        if data.callback_site != cupti::API_ENTER
            || data.symbol_name.is_null()
            || data.function_params.is_null()
        {
            return;
        }
        let name = std::ffi::CStr::from_ptr(data.symbol_name).to_bytes();
        if name.windows(PROBE_NAME.len()).any(|w| w == PROBE_NAME) {
            let params = &*(data.function_params as *const cupti::LaunchKernelParams);
            PROBED_STREAM.store(params.h_stream as usize, Ordering::SeqCst);
        }
    }
}

/// The CUDA stream CubeCL launches the calling thread's kernels on (module doc): subscribe to
/// CUPTI's launch callbacks, launch the probe kernel through `client`, wait for CubeCL to have
/// issued it, unsubscribe. `None` when CUPTI is missing or refuses (one subscriber per
/// process: Nsight Compute's own). Called with [`handles`] locked, so one probe at a time.
fn find_stream(client: &ComputeClient<CudaRuntime>) -> Option<usize> {
    use burn_cubecl::cubecl::prelude::{ArrayArg, CubeCount, CubeDim};
    let api = cupti::api()?;
    let mut subscriber: cupti::Subscriber = std::ptr::null_mut();
    // SAFETY: `on_launch` only reads the callback data CUPTI hands it.
    if unsafe { (api.subscribe)(&mut subscriber, on_launch, std::ptr::null_mut()) }
        != cupti::SUCCESS
    {
        return None;
    }
    PROBED_STREAM.store(0, Ordering::SeqCst);
    // SAFETY: a live subscriber.
    let enabled = unsafe {
        (api.enable_callback)(
            1,
            subscriber,
            cupti::DOMAIN_DRIVER_API,
            cupti::CBID_CU_LAUNCH_KERNEL,
        )
    } == cupti::SUCCESS;
    if enabled {
        let buf = client.empty(4);
        // SAFETY: the probe writes word 0 of its 4-byte buffer.
        unsafe {
            probe_kernel::llm_stream_probe::launch_unchecked::<CudaRuntime>(
                client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(1),
                ArrayArg::from_raw_parts(buf, 1),
            );
        }
        let _ = burn_cubecl::cubecl::future::block_on(client.sync());
    }
    // SAFETY: the subscriber from above.
    unsafe { (api.unsubscribe)(subscriber) };
    let stream = PROBED_STREAM.swap(0, Ordering::SeqCst);
    (enabled && stream != 0).then_some(stream)
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

/// A new device buffer holding `bytes`, copied from `bytes` (a file mapping or a reused host
/// buffer), or `None` if a driver call failed.
///
/// Why not CubeCL's `create_from_slice`: it copies the bytes into its pinned staging pool
/// first, and Burn's `from_data` wants them in an owned `Vec`; on the device machine fresh host
/// pages are written at ~0.5 GB/s (docs/benchmarks.md, run 14), which made those copies most of
/// a load's upload time. Small copies go straight from `bytes` (the driver stages pageable
/// memory itself); larger ones through [`Staging`]'s pinned buffers, several host threads
/// filling one while the DMA drains the other (the driver's own pageable path: ~4 GB/s, 1 s
/// of an 8B load, run 20).
pub fn copy_in(
    client: &ComputeClient<CudaRuntime>,
    device: &CudaDevice,
    bytes: &[u8],
) -> Option<Handle> {
    let handle = client.empty(bytes.len());
    // A round trip through CubeCL's server thread: the allocation is made.
    let resource = client.get_resource(handle.clone()).ok()?;
    copy_to(device.index, resource.resource().ptr, bytes)?;
    drop(resource);
    Some(handle)
}

/// `bytes` to device address `dst` of device `ordinal`, through [`Staging`] past
/// [`STAGED_FROM`] bytes, returning once they are on the device.
fn copy_to(ordinal: usize, dst: cudarc::driver::sys::CUdeviceptr, bytes: &[u8]) -> Option<()> {
    let ctx = context(ordinal)?;
    ctx.bind_to_thread().ok()?;
    // The allocation may be stream-ordered on CubeCL's stream: wait for it. After the copy,
    // wait again: a pageable copy returns once the bytes are staged, before the DMA ends, and
    // CubeCL's kernels run on a stream the copy does not order against.
    ctx.synchronize().ok()?;
    match staging(ordinal).filter(|_| bytes.len() >= STAGED_FROM) {
        Some(staging) => {
            let mut staging = staging.lock().ok()?;
            // SAFETY: the caller keeps `dst` (`bytes.len()` bytes) alive until this returns
            // (`Staging::copy` waits for its stream, also when it fails).
            unsafe { staging.copy(dst, bytes) }?;
        }
        // SAFETY: as above, until the context sync below.
        None => unsafe { cudarc::driver::result::memcpy_htod_sync(dst, bytes) }.ok()?,
    }
    ctx.synchronize().ok()
}

/// What a queued copy uploads, made on the uploading thread (so that work such as expanding
/// a double-quantized absmax runs beside the load's quantizing too).
pub type UploadBytes = Box<dyn FnOnce() -> Box<dyn AsRef<[u8]> + Send> + Send>;

/// [`copy_in`] that returns at once: the allocation is made here, the copy queued to the
/// device's upload thread, which runs the copies in order while the caller goes on (a load
/// quantizes the next weight on the host while this one's bytes go to the device: on the 8B
/// the NF4 upload was 0.62 s of a 3 s load after its 1.9 s of quantizing, run 20). At most
/// [`UPLOADS_QUEUED`] copies wait, so a load holds a bounded amount of host memory; further
/// calls block. The copy belongs to the calling thread's group (a load runs on one thread):
/// nothing may read the buffer before that thread's [`finish_uploads`] has returned. `Err`
/// gives `bytes` back where nothing was queued (no upload thread, no address), for the caller
/// to copy them another way.
pub fn copy_in_queued(
    client: &ComputeClient<CudaRuntime>,
    device: &CudaDevice,
    len: usize,
    bytes: UploadBytes,
) -> Result<Handle, UploadBytes> {
    let Some(jobs) = upload_thread(device.index) else {
        return Err(bytes);
    };
    let handle = client.empty(len);
    let Ok(resource) = client.get_resource(handle.clone()) else {
        return Err(bytes);
    };
    let group = UPLOAD_GROUP.with(|g| g.borrow_mut().get_or_insert_with(Default::default).clone());
    let job = UploadJob {
        dst: resource.resource().ptr,
        len,
        bytes,
        keep: Box::new(resource),
        done: PendingCopy::new(group),
    };
    // The sender is never poisoned (nothing panics while holding it) and the upload thread
    // lives as long as the process, so the send only blocks while the queue is full.
    let sent = match jobs.lock() {
        Ok(jobs) => jobs.send(job).map_err(|e| e.0),
        Err(_) => Err(job),
    };
    match sent {
        Ok(()) => Ok(handle),
        Err(job) => {
            job.done.finish(Ok(()));
            Err(job.bytes)
        }
    }
}

/// Wait until every copy the calling thread queued with [`copy_in_queued`] since its last call
/// is on the device; the first failure's reason if one failed (its buffer holds garbage: the
/// load must fail). Each load has its group, so two loads at once wait for and answer for
/// their own copies only.
pub fn finish_uploads() -> Result<(), String> {
    let Some(group) = UPLOAD_GROUP.with(|g| g.borrow_mut().take()) else {
        return Ok(());
    };
    let (lock, done) = &*group;
    let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
    while state.pending > 0 {
        state = done.wait(state).unwrap_or_else(|p| p.into_inner());
    }
    state.failed.take().map_or(Ok(()), Err)
}

/// Copies that may wait in a device's upload queue (a big linear's packed codes are ~29 MB).
const UPLOADS_QUEUED: usize = 4;

/// One load's queued copies: how many have not ended, the first failure.
type UploadGroup = Arc<(Mutex<UploadState>, std::sync::Condvar)>;

#[derive(Default)]
struct UploadState {
    pending: usize,
    failed: Option<String>,
}

thread_local! {
    /// The group of the load running on this thread, from its first queued copy to its
    /// [`finish_uploads`].
    static UPLOAD_GROUP: std::cell::RefCell<Option<UploadGroup>> = const { std::cell::RefCell::new(None) };
}

/// A queued copy's place in its group's count: [`PendingCopy::finish`] takes it out; dropped
/// unfinished (the upload thread panicked, or its queue was dropped), it counts as failed, so
/// that no wait hangs.
struct PendingCopy(Option<UploadGroup>);

impl PendingCopy {
    fn new(group: UploadGroup) -> Self {
        group.0.lock().unwrap_or_else(|p| p.into_inner()).pending += 1;
        PendingCopy(Some(group))
    }

    fn finish(mut self, result: Result<(), String>) {
        if let Some(group) = self.0.take() {
            let (lock, done) = &*group;
            let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
            state.pending -= 1;
            if let Err(e) = result {
                state.failed.get_or_insert(e);
            }
            done.notify_all();
        }
    }
}

impl Drop for PendingCopy {
    fn drop(&mut self) {
        if self.0.is_some() {
            PendingCopy(self.0.take()).finish(Err("the upload thread stopped".into()));
        }
    }
}

struct UploadJob {
    dst: cudarc::driver::sys::CUdeviceptr,
    len: usize,
    bytes: UploadBytes,
    /// Keeps the destination allocated until the copy has ended.
    keep: Box<dyn Send>,
    done: PendingCopy,
}

/// Device `ordinal`'s upload queue, its thread started at the first queued copy; kept for the
/// process.
fn upload_thread(ordinal: usize) -> Option<&'static Mutex<std::sync::mpsc::SyncSender<UploadJob>>> {
    type Queues = HashMap<usize, &'static Mutex<std::sync::mpsc::SyncSender<UploadJob>>>;
    static QUEUES: OnceLock<Mutex<Queues>> = OnceLock::new();
    let mut map = QUEUES.get_or_init(Default::default).lock().ok()?;
    if let Some(q) = map.get(&ordinal) {
        return Some(*q);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<UploadJob>(UPLOADS_QUEUED);
    std::thread::Builder::new()
        .name(format!("llm-upload-{ordinal}"))
        .spawn(move || {
            for job in rx {
                let UploadJob {
                    dst,
                    len,
                    bytes,
                    keep,
                    done,
                } = job;
                // A panic (making the bytes, a thread the staging could not spawn) fails this
                // copy and leaves the thread serving the next.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let bytes = bytes();
                    let bytes = (*bytes).as_ref();
                    if bytes.len() != len {
                        return Err(format!("{} bytes for a buffer of {len}", bytes.len()));
                    }
                    copy_to(ordinal, dst, bytes).ok_or_else(|| "a driver call failed".to_string())
                }))
                .unwrap_or_else(|_| Err("the copy panicked".into()));
                drop(keep);
                done.finish(result.map_err(|e| format!("copying a weight to cuda:{ordinal}: {e}")));
            }
        })
        .ok()?;
    let queue: &'static Mutex<_> = Box::leak(Box::new(Mutex::new(tx)));
    map.insert(ordinal, queue);
    Some(queue)
}

/// Copies of at least this many bytes go through [`Staging`].
const STAGED_FROM: usize = 1 << 20;

/// Two pinned host buffers and a copy stream of one device, kept for the process's life (64
/// MiB of page-locked host memory): a copy fills one buffer on several threads while the DMA
/// of the other runs, an event per buffer saying when its DMA is done.
struct Staging {
    stream: cudarc::driver::sys::CUstream,
    buffers: [(*mut u8, cudarc::driver::sys::CUevent); 2],
}

// SAFETY: the raw handles are plain driver objects of the device's primary context (which
// lives as long as the process), usable from any thread that binds that context, as
// `copy_in` does before using them; the mutex `Staging` lives behind lets one thread at a time
// touch the buffers and the stream.
unsafe impl Send for Staging {}

/// Bytes per pinned buffer of [`Staging`].
const STAGE_BYTES: usize = 32 << 20;

/// The device's [`Staging`], made at its first copy (its context bound to the thread); `None`
/// if the driver refused to make it (remembered: copies then go the driver's pageable way).
fn staging(ordinal: usize) -> Option<&'static Mutex<Staging>> {
    /// Per device ordinal: its staging, or `None` where the driver refused it.
    type Stagings = HashMap<usize, Option<&'static Mutex<Staging>>>;
    static STAGINGS: OnceLock<Mutex<Stagings>> = OnceLock::new();
    let mut map = STAGINGS.get_or_init(Default::default).lock().ok()?;
    *map.entry(ordinal).or_insert_with(|| {
        let made = Staging::new();
        if made.is_none() {
            eprintln!("pinned staging buffers refused by the driver: loads copy pageable memory");
        }
        made.map(|s| &*Box::leak(Box::new(Mutex::new(s))))
    })
}

impl Staging {
    /// The stream, events and buffers, on the bound context; what was made is freed again if a
    /// later step fails.
    fn new() -> Option<Staging> {
        use cudarc::driver::result::{event, free_host, malloc_host, stream};
        use cudarc::driver::sys;
        let stream = stream::create(stream::StreamKind::NonBlocking).ok()?;
        let mut made: Vec<(*mut u8, sys::CUevent)> = Vec::with_capacity(2);
        let free = |made: &[(*mut u8, sys::CUevent)]| {
            for &(ptr, ev) in made {
                // SAFETY: made just above, never shared.
                unsafe {
                    let _ = free_host(ptr.cast());
                    let _ = event::destroy(ev);
                }
            }
            // SAFETY: made just above, nothing queued on it.
            let _ = unsafe { stream::destroy(stream) };
        };
        for _ in 0..2 {
            // SAFETY: a plain page-locked allocation of the bound context.
            let Ok(ptr) = (unsafe { malloc_host(STAGE_BYTES, 0) }) else {
                free(&made);
                return None;
            };
            let Ok(ev) = event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING) else {
                // SAFETY: allocated just above.
                let _ = unsafe { free_host(ptr) };
                free(&made);
                return None;
            };
            made.push((ptr.cast::<u8>(), ev));
        }
        Some(Staging {
            stream,
            buffers: [made[0], made[1]],
        })
    }

    /// `bytes` to device address `dst` in [`STAGE_BYTES`] pieces, returning once all of it is
    /// on the device, or `None` (after the copies already queued have ended) if a driver call
    /// failed.
    ///
    /// # Safety
    /// `dst` must be a live device allocation of at least `bytes.len()` bytes of the bound
    /// context, alive until this returns.
    unsafe fn copy(&mut self, dst: cudarc::driver::sys::CUdeviceptr, bytes: &[u8]) -> Option<()> {
        // SAFETY: as this function's.
        let queued = unsafe { self.queue(dst, bytes) };
        // Whatever was queued ends before the caller may free or reuse `dst` (or this refills
        // a buffer): also after a failure, whose pieces may still be in flight.
        // SAFETY: the stream made in `Staging::new`.
        let drained = unsafe { cudarc::driver::result::stream::synchronize(self.stream) };
        queued.and(drained.ok())
    }

    /// [`Self::copy`]'s pieces, queued on the stream.
    ///
    /// # Safety
    /// As [`Self::copy`]; the caller waits for the stream before `dst` or `bytes` go.
    unsafe fn queue(&mut self, dst: cudarc::driver::sys::CUdeviceptr, bytes: &[u8]) -> Option<()> {
        use cudarc::driver::result::{event, memcpy_htod_async};
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        for (i, piece) in bytes.chunks(STAGE_BYTES).enumerate() {
            let (buffer, done) = self.buffers[i % 2];
            // SAFETY: the buffer's last DMA has ended once its event has (an event never
            // recorded counts as done).
            unsafe { event::synchronize(done) }.ok()?;
            // SAFETY: `buffer` holds STAGE_BYTES >= piece.len() bytes, no DMA reads it now.
            let staged = unsafe { std::slice::from_raw_parts_mut(buffer, piece.len()) };
            let part = piece.len().div_ceil(threads).max(1 << 20);
            std::thread::scope(|scope| {
                for (to, from) in staged.chunks_mut(part).zip(piece.chunks(part)) {
                    scope.spawn(move || to.copy_from_slice(from));
                }
            });
            let at = dst + (i * STAGE_BYTES) as u64;
            // SAFETY: `staged` is pinned and is not written again before `done` (recorded
            // right after) has passed; `at..at + len` lies in `dst`'s allocation.
            unsafe { memcpy_htod_async(at, &*staged, self.stream) }.ok()?;
            // A failed record leaves the event behind the DMA: this copy stops here, and
            // `copy` drains the stream before any buffer is filled again.
            unsafe { event::record(done, self.stream) }.ok()?;
        }
        Some(())
    }
}

/// Handles by device ordinal, created at first use and dropped by [`release`] when a model
/// leaves the device (so an unload hands cuBLAS's workspace back too).
/// Keyed by (device ordinal, CubeCL stream id).
fn handles() -> &'static Mutex<HashMap<(usize, u64), Blas>> {
    static HANDLES: OnceLock<Mutex<HashMap<(usize, u64), Blas>>> = OnceLock::new();
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
    let Ok(mut h) = handles().lock() else {
        return;
    };
    let keys: Vec<_> = h.keys().filter(|k| k.0 == device.index).copied().collect();
    for key in keys {
        if let Some(blas) = h.remove(&key) {
            // Another model's GEMMs may still run on the device: let them end before the
            // handle (and the workspace they use) goes.
            if blas.ctx.bind_to_thread().is_ok() {
                let _ = blas.ctx.synchronize();
            }
            drop(blas);
        }
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
/// CubeCL stream: on that very stream (module doc). The weights share one buffer and the
/// outputs another, so the device addresses cost three round trips to CubeCL's server thread,
/// whatever the group's size. Returns false when cuBLAS is not [`available`] or a call fails
/// (the caller falls back to Burn's matmul, which CubeCL's stream runs after whatever was
/// enqueued here).
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
    if parts.is_empty() {
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
    with_blas([x, w, out], |blas, [x_ptr, w_ptr, out_ptr]| {
        let (one, zero) = (1.0f32, 0.0f32);
        let bf16 = 2u64;
        for p in parts {
            // SAFETY: the pointers are live device allocations holding the stated bf16 ranges
            // (checked above), and the handle runs on CubeCL's stream, which reuses none of
            // them before these GEMMs are done.
            let status = unsafe {
                blas::gemm_ex(
                    *blas.handle(),
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
                return give_up(&format!("cublasGemmEx: {e:?}"));
            }
        }
        true
    })
}

/// One operand of a [`batched_gemm`]: its tensor, the element where batch 0's matrix begins,
/// the leading dimension and the stride between batches (elements, column-major as cuBLAS
/// reads them).
pub struct Operand<'a> {
    pub t: &'a CubeTensor<CudaRuntime>,
    pub at: usize,
    pub ld: usize,
    pub stride: usize,
}

impl<'a> Operand<'a> {
    pub fn new(t: &'a CubeTensor<CudaRuntime>, at: usize, ld: usize, stride: usize) -> Self {
        Operand { t, at, ld, stride }
    }
}

/// `C_i = alpha · op(A_i) · op(B_i)` (`C_i` `[m, n]`, column-major) for `batch` matrices
/// `i`, on cuBLAS (`cublasGemmStridedBatchedEx`, f32 accumulation), ordered on the calling
/// thread's CubeCL stream as [`linears`] is. `transpose_a`: `op(A)` = `A^T`, `A` stored
/// `[k, m]`; likewise `B`. Operands bf16 or f32 (their dtypes passed to cuBLAS), contiguous.
/// False when cuBLAS is not [`available`] or the call fails: nothing of `C` is then to be read.
#[allow(clippy::too_many_arguments)]
pub fn batched_gemm(
    [m, n, k]: [usize; 3],
    batch: usize,
    alpha: f32,
    a: Operand,
    transpose_a: bool,
    b: Operand,
    transpose_b: bool,
    c: Operand,
) -> bool {
    let kind = |t: &CubeTensor<CudaRuntime>| match t.dtype {
        DType::BF16 => Some((blas_sys::cudaDataType::CUDA_R_16BF, 2u64)),
        DType::F32 => Some((blas_sys::cudaDataType::CUDA_R_32F, 4u64)),
        _ => None,
    };
    let (Some((a_type, a_size)), Some((b_type, b_size)), Some((c_type, c_size))) =
        (kind(a.t), kind(b.t), kind(c.t))
    else {
        return false;
    };
    assert!(
        [a.t, b.t, c.t].iter().all(|t| t.is_contiguous()),
        "cuBLAS GEMM operands are contiguous"
    );
    // The last element each operand's batches reach, within its buffer.
    let reach = |o: &Operand, rows: usize, cols: usize| {
        o.at + (batch - 1) * o.stride + (cols - 1) * o.ld + rows
    };
    let (a_rows, a_cols) = if transpose_a { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if transpose_b { (n, k) } else { (k, n) };
    assert!(
        batch > 0
            && reach(&a, a_rows, a_cols) <= a.t.meta.shape().num_elements()
            && reach(&b, b_rows, b_cols) <= b.t.meta.shape().num_elements()
            && reach(&c, m, n) <= c.t.meta.shape().num_elements()
            && a.ld >= a_rows
            && b.ld >= b_rows
            && c.ld >= m,
        "batched GEMM past its buffers"
    );
    let op = |t: bool| {
        if t {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    with_blas([a.t, b.t, c.t], |blas, [a_ptr, b_ptr, c_ptr]| {
        let zero = 0.0f32;
        // SAFETY: every batch's matrix lies inside its live allocation (checked above), the
        // types are the tensors' own, and the handle runs on CubeCL's stream, which reuses
        // none of the buffers before the GEMM is done.
        let status = unsafe {
            blas::gemm_strided_batched_ex(
                *blas.handle(),
                op(transpose_a),
                op(transpose_b),
                m as i32,
                n as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                (a_ptr + a_size * a.at as u64) as *const std::ffi::c_void,
                a_type,
                a.ld as i32,
                a.stride as i64,
                (b_ptr + b_size * b.at as u64) as *const std::ffi::c_void,
                b_type,
                b.ld as i32,
                b.stride as i64,
                (&zero as *const f32).cast(),
                (c_ptr + c_size * c.at as u64) as *mut std::ffi::c_void,
                c_type,
                c.ld as i32,
                c.stride as i64,
                batch as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        match status {
            Ok(()) => true,
            Err(e) => give_up(&format!("cublasGemmStridedBatchedEx: {e:?}")),
        }
    })
}

/// `f` with a cuBLAS handle on the calling thread's CubeCL stream (module doc) and the device
/// addresses of `operands`; false, without calling `f`, when cuBLAS is not [`available`] or
/// cannot be set up.
fn with_blas<const N: usize>(
    operands: [&CubeTensor<CudaRuntime>; N],
    f: impl FnOnce(&CudaBlas, [u64; N]) -> bool,
) -> bool {
    if !available() {
        return false;
    }
    let client = operands[0].client.clone();
    let device = operands[0].device.clone();
    let Ok(mut handles) = handles().lock() else {
        return false;
    };
    // Device addresses. Each `get_resource` is a round trip through CubeCL's server: it
    // flushes the launches CubeCL batches and returns after they are issued, so whatever wrote
    // the operands is on the stream before the GEMMs are enqueued. Keep these calls (or an
    // explicit flush) if the addresses are ever cached. The managed resources keep the
    // allocations alive until we return.
    let mut keep = Vec::with_capacity(N);
    let mut base = [0u64; N];
    for (slot, t) in base.iter_mut().zip(operands) {
        let Ok(r) = client.get_resource(t.handle.clone()) else {
            return give_up("an operand's address");
        };
        *slot = r.resource().ptr;
        keep.push(r);
    }
    let stream_id = burn_cubecl::cubecl::stream_id::StreamId::current().value;
    let blas = match handles.entry((device.index, stream_id)) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            // Not cached when it fails: cuBLAS is off until the next load, which probes again.
            let Some(stream) = find_stream(&client) else {
                // Host waits would be slower than Burn's matmul (module doc).
                return give_up("CubeCL's CUDA stream not found (CUPTI missing or refused)");
            };
            let Some(blas) = new_handle(device.index) else {
                return give_up("no cuBLAS handle");
            };
            // SAFETY: a live handle, and a live stream of the same context (CubeCL keeps its
            // streams for the process).
            if let Err(err) =
                unsafe { blas::set_stream(*blas.blas.handle(), stream as blas_sys::cudaStream_t) }
            {
                return give_up(&format!("cublasSetStream: {err:?}"));
            }
            e.insert(blas)
        }
    };
    if let Err(e) = blas.ctx.bind_to_thread() {
        return give_up(&format!("binding the context: {e:?}"));
    }
    let done = f(&blas.blas, base);
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
    let blas = CudaBlas::new(stream).ok()?;
    Some(Blas { blas, ctx })
}
