//! Model file formats, read without Burn so the server (tokenizer, chat template, architecture
//! sniffing) and the plugins (weights) share one reader.
//!
//! A [`ModelSource`] is what `--load NAME=SOURCE` names: an HF directory (config.json +
//! safetensors, sharded or not) or a GGUF file. Both expose:
//! - an HF-style `config.json` value (GGUF metadata is translated to HF keys, the way transformers'
//!   `load_gguf_checkpoint` does it),
//! - tensors under HF checkpoint names, converted to f32 one at a time (the files are
//!   memory-mapped, and a tensor's mapped pages leave the resident set once it is read: peak host
//!   memory stays near the tensors in use, not the shards read so far),
//! - raw bytes for tensors that must be kept as stored (pre-quantized checkpoints).

pub mod gguf;
pub mod safetensors_dir;

use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use gguf::GgufFile;
pub use safetensors_dir::SafetensorsDir;

/// Everything that can go wrong reading model files. Messages always name the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{0}")]
    NotFound(String),
    /// Present but truncated or corrupt.
    #[error("{0}")]
    Corrupt(String),
    /// Well-formed but not acceptable (a bad config value, a tensor of the wrong shape).
    #[error("{0}")]
    Invalid(String),
    /// Valid, but a variant this project does not implement.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, FormatError>;

/// Storage dtype of a tensor as found in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
    U8,
    I8,
    I32,
    I64,
    /// A GGUF block-quantized type, by its ggml type id.
    Ggml(u32),
}

impl StoredDtype {
    /// Bytes per value of a float dtype (F32, F16, BF16); None for the others.
    pub fn float_width(self) -> Option<usize> {
        match self {
            StoredDtype::F32 => Some(4),
            StoredDtype::F16 | StoredDtype::BF16 => Some(2),
            _ => None,
        }
    }
}

/// Little-endian stored floats of a float dtype (see [`StoredDtype::float_width`]) widened to
/// f32 into `out` (exact), one value per `out` element. Always inlined: NF4's quantizer calls
/// it per block from loops compiled for AVX2 and AVX-512 where the host has them, and the
/// widening should be compiled for them too.
#[inline(always)]
pub fn floats_into(dtype: StoredDtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        StoredDtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        StoredDtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        StoredDtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        other => panic!("floats_into: {other:?} is not a float dtype"),
    }
}

/// A tensor converted to f32, row-major, with its HF shape.
#[derive(Debug, Clone)]
pub struct F32Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Raw stored bytes of a tensor, borrowed from the mapped file. Dropping it takes the tensor's
/// pages out of the process's resident set: a load that reads every shard through its mapping
/// would otherwise count all of them (16 GB for an 8B model) until the files close, where HF's
/// loader holds about a shard at a time.
pub struct RawTensor<'a> {
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
    /// The read-only file mapping `data` lies in, and `data`'s offset in it. Only a shared
    /// mapping of a file may go here: on a private mapping with written pages, or an anonymous
    /// one, MADV_DONTNEED would discard the bytes.
    #[cfg_attr(not(unix), allow(dead_code))]
    mapping: (&'a Mmap, usize),
}

impl<'a> RawTensor<'a> {
    /// Bytes `range` of `mmap`, a read-only shared mapping of a model file (`Mmap::map`).
    fn mapped(
        dtype: StoredDtype,
        shape: Vec<usize>,
        mmap: &'a Mmap,
        range: std::ops::Range<usize>,
    ) -> RawTensor<'a> {
        RawTensor {
            dtype,
            shape,
            data: &mmap[range.clone()],
            mapping: (mmap, range.start),
        }
    }
}

impl Drop for RawTensor<'_> {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            let (mmap, offset) = self.mapping;
            // SAFETY: `mmap` maps a file shared and read-only, so after MADV_DONTNEED a read of
            // these pages maps the file's page-cache pages again: every borrow of the mapping
            // (another RawTensor of the same bytes, a neighbour sharing an edge page) still
            // reads the same bytes. Only the resident set changes. A failure is harmless.
            let _ = unsafe {
                mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    offset,
                    self.data.len(),
                )
            };
        }
    }
}

/// Weights by HF checkpoint name.
pub trait TensorStore: Send + Sync {
    /// Whether a tensor of this HF name exists.
    fn contains(&self, name: &str) -> bool;
    /// All HF names, sorted.
    fn names(&self) -> Vec<String>;
    /// HF shape of a tensor without reading its data.
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    /// Read one tensor and convert it to f32.
    fn f32(&self, name: &str) -> Result<F32Tensor>;
    /// The stored bytes of a tensor (no conversion), for formats kept as they are.
    fn raw(&self, name: &str) -> Result<RawTensor<'_>>;
}

/// What `--load NAME=SOURCE` points at, opened.
pub enum ModelSource {
    /// An HF model directory.
    HfDir {
        dir: PathBuf,
        config: serde_json::Value,
        generation_config: Option<serde_json::Value>,
        weights: SafetensorsDir,
    },
    /// A single GGUF file; config and tokenizer come from its metadata.
    Gguf {
        path: PathBuf,
        config: serde_json::Value,
        file: GgufFile,
    },
}

impl ModelSource {
    /// Open a source: a `.gguf` file, or a directory holding config.json and safetensors.
    pub fn open(path: &Path) -> Result<ModelSource> {
        if !path.exists() {
            return Err(FormatError::NotFound(format!(
                "model source {} does not exist",
                path.display()
            )));
        }
        if path.is_file() {
            let file = GgufFile::open(path)?;
            let config = file.hf_config()?;
            return Ok(ModelSource::Gguf {
                path: path.to_path_buf(),
                config,
                file,
            });
        }
        let config = read_config(path)?;
        let generation_config = read_json_opt(&path.join("generation_config.json"))?;
        let weights = SafetensorsDir::open(path)?;
        Ok(ModelSource::HfDir {
            dir: path.to_path_buf(),
            config,
            generation_config,
            weights,
        })
    }

    /// The HF-style config.json value.
    pub fn config(&self) -> &serde_json::Value {
        match self {
            ModelSource::HfDir { config, .. } | ModelSource::Gguf { config, .. } => config,
        }
    }

    pub fn tensors(&self) -> &dyn TensorStore {
        match self {
            ModelSource::HfDir { weights, .. } => weights,
            ModelSource::Gguf { file, .. } => file,
        }
    }

    /// `model_type` as HF spells it ("llama", "phi3", ...).
    pub fn model_type(&self) -> Result<String> {
        model_type_of(self.config(), &self.describe())
    }

    /// A short human name of the source for messages.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::HfDir { dir, .. } => dir.join("config.json").display().to_string(),
            ModelSource::Gguf { path, .. } => path.display().to_string(),
        }
    }
}

/// Read `model_type` from a config value.
pub fn model_type_of(config: &serde_json::Value, what: &str) -> Result<String> {
    config
        .get("model_type")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| FormatError::Invalid(format!("{what}: field `model_type` is missing")))
}

/// Read `<dir>/config.json`, with errors naming it.
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    read_json_opt(&path)?.ok_or_else(|| {
        FormatError::NotFound(format!(
            "{} is missing: an HF model directory needs config.json",
            path.display()
        ))
    })
}

/// Read a JSON file if it exists.
pub fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            FormatError::Corrupt(format!("{} is not valid JSON: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FormatError::NotFound(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}
