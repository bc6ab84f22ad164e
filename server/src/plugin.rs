//! Loading architecture plugins (cdylibs) and calling them through the C ABI of `llm-abi`.
//!
//! Libraries are never closed: dlclose of a Rust cdylib that started threads or thread-locals is
//! unsound, so a `Library` is leaked once loaded. Unloading a model destroys its handle, which
//! drops weights and caches; the code stays mapped.

use std::collections::BTreeMap;
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libloading::Library;
use llm_abi::{
    read_c_str, AbiError, BackendVTable, EntryFn, ErrorCode, ModelHandle, SeqInput, SeqOutput,
    ABI_VERSION, ENTRY_SYMBOL,
};

use crate::error::{Result, ServerError};

/// A loaded plugin library.
pub struct Plugin {
    pub name: String,
    pub model_types: Vec<String>,
    pub path: PathBuf,
    vtable: &'static BackendVTable,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish()
    }
}

fn plugin_error(path: &Path, message: impl std::fmt::Display) -> ServerError {
    ServerError::Internal(format!("plugin {}: {message}", path.display()))
}

impl Plugin {
    /// Load one library and check its ABI before reading anything else from it.
    pub fn open(path: &Path) -> Result<Plugin> {
        // SAFETY: loading runs the library's initializers; only files matching the plugin naming
        // pattern inside the configured plugin directory are ever opened.
        let lib = unsafe { Library::new(path) }.map_err(|e| plugin_error(path, e))?;
        let lib: &'static Library = Box::leak(Box::new(lib));
        // SAFETY: the symbol's type is fixed by the ABI crate; its name carries the ABI version.
        let entry = unsafe { lib.get::<EntryFn>(ENTRY_SYMBOL) }.map_err(|e| {
            plugin_error(
                path,
                format!("no entry symbol (not an llm plugin, or an older ABI): {e}"),
            )
        })?;
        // SAFETY: the entry function takes no arguments and returns a pointer to static data.
        let vtable = unsafe { entry() };
        // SAFETY: checked non-null; the first field is read before any other.
        let vtable: &'static BackendVTable =
            unsafe { vtable.as_ref() }.ok_or_else(|| plugin_error(path, "entry returned null"))?;
        if vtable.abi_version != ABI_VERSION {
            return Err(plugin_error(
                path,
                format!(
                    "ABI version {} (this server speaks {ABI_VERSION})",
                    vtable.abi_version
                ),
            ));
        }
        if vtable.vtable_size != std::mem::size_of::<BackendVTable>() {
            return Err(plugin_error(
                path,
                "vtable layout differs from this server's",
            ));
        }
        // SAFETY: static NUL-terminated strings per the ABI.
        let name = unsafe { read_c_str(vtable.name) }
            .ok_or_else(|| plugin_error(path, "bad name"))?
            .to_string();
        let types = unsafe { read_c_str(vtable.model_types) }.unwrap_or("[]");
        let model_types: Vec<String> = serde_json::from_str(types)
            .map_err(|e| plugin_error(path, format!("bad model_types: {e}")))?;
        Ok(Plugin {
            name,
            model_types,
            path: path.to_path_buf(),
            vtable,
        })
    }

    /// Turn an [`AbiError`] filled by the plugin into a [`ServerError`], freeing its message.
    fn take_error(&self, rc: i32, err: AbiError) -> ServerError {
        let message = if err.message.is_null() {
            format!("plugin {} failed with code {rc}", self.name)
        } else {
            // SAFETY: the plugin wrote a NUL-terminated string it allocated; we free it with its
            // own free function after copying.
            let m = unsafe { read_c_str(err.message) }
                .unwrap_or("(invalid UTF-8)")
                .to_string();
            unsafe { (self.vtable.free_string)(err.message) };
            m
        };
        ServerError::Plugin {
            code: ErrorCode::from_i32(if err.code != 0 { err.code } else { rc }),
            message,
        }
    }

    /// Load a model. `request` is the JSON described by `llm_abi::load_request`.
    pub fn load(self: &Arc<Self>, request: &serde_json::Value) -> Result<PluginModel> {
        let req =
            CString::new(request.to_string()).map_err(|e| ServerError::Internal(e.to_string()))?;
        let mut handle: *mut ModelHandle = std::ptr::null_mut();
        let mut err = AbiError::ok();
        // SAFETY: valid C string, out pointers to locals.
        let rc = unsafe { (self.vtable.load)(req.as_ptr(), &mut handle, &mut err) };
        if rc != 0 || handle.is_null() {
            return Err(self.take_error(rc, err));
        }
        Ok(PluginModel {
            plugin: self.clone(),
            handle,
        })
    }
}

impl Plugin {
    /// Describe a model from its config (`llm_abi::describe_request` in, `describe_response` out).
    pub fn describe(&self, request: &serde_json::Value) -> Result<serde_json::Value> {
        let req =
            CString::new(request.to_string()).map_err(|e| ServerError::Internal(e.to_string()))?;
        let mut out: *mut c_char = std::ptr::null_mut();
        let mut err = AbiError::ok();
        // SAFETY: valid C string, out pointers to locals.
        let rc = unsafe { (self.vtable.describe)(req.as_ptr(), &mut out, &mut err) };
        if rc != 0 {
            return Err(self.take_error(rc, err));
        }
        // SAFETY: plugin-allocated string, freed by the plugin after copying.
        let text = unsafe { read_c_str(out) }.unwrap_or("{}").to_string();
        unsafe { (self.vtable.free_string)(out) };
        serde_json::from_str(&text)
            .map_err(|e| ServerError::Internal(format!("plugin describe: {e}")))
    }
}

/// A model living inside a plugin. Used from one thread at a time (the model's scheduler).
pub struct PluginModel {
    plugin: Arc<Plugin>,
    handle: *mut ModelHandle,
}

// SAFETY: the handle is only used through &mut self (one thread at a time); plugins keep no
// thread affinity for their models.
unsafe impl Send for PluginModel {}

impl PluginModel {
    pub fn info(&mut self) -> Result<serde_json::Value> {
        let mut out: *mut c_char = std::ptr::null_mut();
        let mut err = AbiError::ok();
        // SAFETY: live handle, out pointers to locals.
        let rc = unsafe { (self.plugin.vtable.info)(self.handle, &mut out, &mut err) };
        if rc != 0 {
            return Err(self.plugin.take_error(rc, err));
        }
        // SAFETY: plugin-allocated string, freed by the plugin after copying.
        let text = unsafe { read_c_str(out) }.unwrap_or("{}").to_string();
        unsafe { (self.plugin.vtable.free_string)(out) };
        serde_json::from_str(&text).map_err(|e| ServerError::Internal(format!("plugin info: {e}")))
    }

    /// One step over a batch; `outputs.len() == inputs.len()`.
    pub fn step(&mut self, inputs: &[SeqInput], outputs: &mut [SeqOutput]) -> Result<()> {
        assert_eq!(inputs.len(), outputs.len());
        let mut err = AbiError::ok();
        // SAFETY: live handle; the slices (and the token buffers they point to) outlive the call.
        let rc = unsafe {
            (self.plugin.vtable.step)(
                self.handle,
                inputs.as_ptr(),
                inputs.len(),
                outputs.as_mut_ptr(),
                &mut err,
            )
        };
        if rc != 0 {
            return Err(self.plugin.take_error(rc, err));
        }
        Ok(())
    }

    pub fn release(&mut self, seq_id: u64) {
        // SAFETY: live handle.
        unsafe { (self.plugin.vtable.release)(self.handle, seq_id) }
    }
}

impl Drop for PluginModel {
    fn drop(&mut self) {
        // SAFETY: the handle came from this plugin's load and is destroyed exactly once.
        unsafe { (self.plugin.vtable.destroy)(self.handle) }
    }
}

/// The plugins found in the plugin directory, by the model types they serve.
#[derive(Debug, Default)]
pub struct Plugins {
    by_type: BTreeMap<String, Arc<Plugin>>,
    pub dir: PathBuf,
}

/// Plugin files are named `lib<arch>_backend.so` (`.dylib` on macOS); nothing else in the
/// directory is ever opened.
pub fn is_plugin_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.starts_with("lib") && (name.ends_with("_backend.so") || name.ends_with("_backend.dylib"))
}

impl Plugins {
    pub fn discover(dir: &Path) -> Result<Plugins> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            ServerError::Internal(format!(
                "cannot read plugin directory {}: {e}",
                dir.display()
            ))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_plugin_file(p))
            .collect();
        files.sort();
        let mut by_type = BTreeMap::new();
        for f in files {
            let plugin = Arc::new(Plugin::open(&f)?);
            tracing::info!(plugin = %plugin.name, path = %f.display(), types = ?plugin.model_types, "plugin loaded");
            for t in &plugin.model_types {
                by_type.entry(t.clone()).or_insert_with(|| plugin.clone());
            }
        }
        Ok(Plugins {
            by_type,
            dir: dir.to_path_buf(),
        })
    }

    pub fn for_model_type(&self, model_type: &str) -> Option<Arc<Plugin>> {
        self.by_type.get(model_type).cloned()
    }

    pub fn model_types(&self) -> Vec<String> {
        self.by_type.keys().cloned().collect()
    }
}
