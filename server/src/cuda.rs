//! The CUDA driver's primary context of the server's default device (`--device cuda[:N]`),
//! retained from start to exit.
//!
//! Why the server holds it, though only plugins run kernels: the primary context is the
//! process's, one per device, and every plugin on the device shares it (CubeCL's CUDA runtime
//! retains the same primary context, `cubecl-cuda` `runtime.rs`). Creating it costs the driver's
//! start (about a second) and ~530 MB of device memory on an H200 (docs/benchmarks.md, run 12),
//! and no plugin hands it back on unload. Retained at start, as TGI and vLLM set up their device
//! before serving: the first LoadModel costs what later ones do, the device memory the server
//! reports before a load already holds the context (so an unload returns to it), and a machine
//! without the driver or the device fails at start, naming the flag, not at the first load.
//!
//! The driver is opened at run time (`libcuda.so.1`, as cudarc does), so the server binary
//! needs no CUDA to build or to serve on the CPU.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

type CuResult = c_int;
type CuDevice = c_int;
type CuContext = *mut c_void;

/// The retained context; released on drop (at exit, after every model is unloaded).
pub struct PrimaryContext {
    release: unsafe extern "C" fn(CuDevice) -> CuResult,
    device: CuDevice,
    /// Kept for `release`, which points into it.
    _driver: libloading::Library,
}

/// What `retain` learnt of the device, for the start-up log.
pub struct DeviceInfo {
    pub name: String,
    pub free_bytes: usize,
    pub total_bytes: usize,
}

impl PrimaryContext {
    /// Retain device `ordinal`'s primary context. `flag` is what the user wrote (`--device
    /// cuda:1`), named in the error.
    pub fn retain(flag: &str, ordinal: u32) -> Result<(PrimaryContext, DeviceInfo), String> {
        let fail = |what: String| format!("--device {flag}: {what}");
        // SAFETY: loading the NVIDIA driver library runs its initialisers only; every symbol
        // below is taken with the signature of the driver API (cuda.h, CUDA 12/13).
        unsafe {
            let driver = libloading::Library::new("libcuda.so.1").map_err(|e| {
                fail(format!(
                    "cannot open the CUDA driver (libcuda.so.1): {e}; is the NVIDIA driver installed?"
                ))
            })?;
            let sym = |name: &str| -> Result<*const c_void, String> {
                driver
                    .get::<*const c_void>(name.as_bytes())
                    .map(|s| *s)
                    .map_err(|e| fail(format!("the CUDA driver lacks {name}: {e}")))
            };
            let init: unsafe extern "C" fn(c_uint) -> CuResult =
                std::mem::transmute(sym("cuInit")?);
            let device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult =
                std::mem::transmute(sym("cuDeviceGet")?);
            let device_count: unsafe extern "C" fn(*mut c_int) -> CuResult =
                std::mem::transmute(sym("cuDeviceGetCount")?);
            let device_name: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult =
                std::mem::transmute(sym("cuDeviceGetName")?);
            let retain: unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult =
                std::mem::transmute(sym("cuDevicePrimaryCtxRetain")?);
            let release: unsafe extern "C" fn(CuDevice) -> CuResult =
                std::mem::transmute(sym("cuDevicePrimaryCtxRelease_v2")?);
            let push: unsafe extern "C" fn(CuContext) -> CuResult =
                std::mem::transmute(sym("cuCtxPushCurrent_v2")?);
            let pop: unsafe extern "C" fn(*mut CuContext) -> CuResult =
                std::mem::transmute(sym("cuCtxPopCurrent_v2")?);
            let mem_info: unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult =
                std::mem::transmute(sym("cuMemGetInfo_v2")?);
            let error_name: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult =
                std::mem::transmute(sym("cuGetErrorName")?);
            let check = |call: &str, r: CuResult| -> Result<(), String> {
                if r == 0 {
                    return Ok(());
                }
                let mut name: *const c_char = std::ptr::null();
                let name = if error_name(r, &mut name) == 0 && !name.is_null() {
                    CStr::from_ptr(name).to_string_lossy().into_owned()
                } else {
                    format!("error {r}")
                };
                Err(fail(format!("{call} failed: {name}")))
            };

            check("cuInit", init(0))?;
            let mut count = 0;
            check("cuDeviceGetCount", device_count(&mut count))?;
            if ordinal as i64 >= count as i64 {
                return Err(fail(format!(
                    "no CUDA device {ordinal}: this machine has {count}"
                )));
            }
            let mut device = 0;
            check("cuDeviceGet", device_get(&mut device, ordinal as c_int))?;
            let mut ctx: CuContext = std::ptr::null_mut();
            check("cuDevicePrimaryCtxRetain", retain(&mut ctx, device))?;
            let held = PrimaryContext {
                release,
                device,
                _driver: driver,
            };
            let mut buf = [0 as c_char; 256];
            check(
                "cuDeviceGetName",
                device_name(buf.as_mut_ptr(), buf.len() as c_int, device),
            )?;
            let name = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
            let (mut free_bytes, mut total_bytes) = (0usize, 0usize);
            check("cuCtxPushCurrent", push(ctx))?;
            let r = mem_info(&mut free_bytes, &mut total_bytes);
            let mut popped: CuContext = std::ptr::null_mut();
            pop(&mut popped);
            check("cuMemGetInfo", r)?;
            Ok((
                held,
                DeviceInfo {
                    name,
                    free_bytes,
                    total_bytes,
                },
            ))
        }
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `retain`; the library is still loaded (dropped after).
        unsafe {
            (self.release)(self.device);
        }
    }
}

/// The ordinal of a `cuda` / `cuda:N` device flag; `None` for the CPU.
pub fn ordinal(device: &str) -> Option<u32> {
    match device {
        "cuda" => Some(0),
        _ => device.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::ordinal;

    #[test]
    fn device_flags_name_their_ordinal() {
        assert_eq!(ordinal("cpu"), None);
        assert_eq!(ordinal("cuda"), Some(0));
        assert_eq!(ordinal("cuda:3"), Some(3));
    }
}
