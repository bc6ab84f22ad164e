//! An HF directory's weights: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (`weight_map`: tensor name -> shard file).
//!
//! Every shard is memory-mapped and its header validated at open (a truncated shard is reported
//! by name before any weight is read); tensors are converted to f32 one at a time.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::{F32Tensor, FormatError, RawTensor, Result, StoredDtype, TensorStore};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

pub struct SafetensorsDir {
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<SafetensorsDir> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let index = crate::read_json_opt(&index_path)?.expect("exists");
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    FormatError::Corrupt(format!(
                        "{}: field `weight_map` is missing or not an object",
                        index_path.display()
                    ))
                })?;
            let mut files: Vec<String> = map
                .values()
                .map(|v| {
                    v.as_str().map(str::to_owned).ok_or_else(|| {
                        FormatError::Corrupt(format!(
                            "{}: `weight_map` values must be file names",
                            index_path.display()
                        ))
                    })
                })
                .collect::<Result<_>>()?;
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(FormatError::NotFound(format!(
                    "{}: neither model.safetensors nor model.safetensors.index.json found",
                    dir.display()
                )));
            }
            vec![single]
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let shard = open_shard(&path)?;
            for name in shard.metadata.tensors().keys() {
                if index.insert(name.clone(), shards.len()).is_some() {
                    return Err(FormatError::Corrupt(format!(
                        "{}: tensor `{name}` is stored in two shards",
                        path.display()
                    )));
                }
            }
            shards.push(shard);
        }
        Ok(SafetensorsDir { shards, index })
    }

    /// One safetensors file on its own (fixtures, single-file checkpoints).
    pub fn open_file(path: &Path) -> Result<SafetensorsDir> {
        let shard = open_shard(path)?;
        let index = shard
            .metadata
            .tensors()
            .keys()
            .map(|k| (k.clone(), 0))
            .collect();
        Ok(SafetensorsDir {
            shards: vec![shard],
            index,
        })
    }

    /// Integer tensor (i64/i32) as i64s.
    pub fn ints(&self, name: &str) -> Result<Vec<i64>> {
        let raw = self.raw(name)?;
        match raw.dtype {
            StoredDtype::I64 => Ok(raw
                .data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect()),
            StoredDtype::I32 => Ok(raw
                .data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect()),
            other => Err(FormatError::Invalid(format!(
                "tensor `{name}` is {other:?}, not an integer tensor"
            ))),
        }
    }

    fn info(&self, name: &str) -> Result<(&Shard, &TensorInfo)> {
        let &i = self.index.get(name).ok_or_else(|| {
            FormatError::Invalid(format!(
                "tensor `{name}` not found in {}",
                self.shards
                    .iter()
                    .map(|s| s.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let shard = &self.shards[i];
        let info = shard.metadata.info(name).expect("indexed");
        Ok((shard, info))
    }

    /// Total bytes of the tensor data over all shards.
    pub fn data_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.mmap.len() - s.data_start)
            .sum()
    }

    /// The shard paths, in order.
    pub fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| {
        FormatError::NotFound(format!("cannot open weights file {}: {e}", path.display()))
    })?;
    // SAFETY: the mapping is read-only; a model file changed underneath a running server is a
    // user error that can at worst give wrong weights (same contract as every mmap-based loader).
    let mmap = unsafe { Mmap::map(&file) }
        .map_err(|e| FormatError::Corrupt(format!("cannot map {}: {e}", path.display())))?;
    let (n, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        FormatError::Corrupt(format!(
            "{} is not a valid safetensors file (truncated or corrupt): {e}",
            path.display()
        ))
    })?;
    Ok(Shard {
        path: path.to_path_buf(),
        mmap,
        data_start: 8 + n,
        metadata,
    })
}

fn stored_dtype(d: Dtype) -> Option<StoredDtype> {
    Some(match d {
        Dtype::F32 => StoredDtype::F32,
        Dtype::F16 => StoredDtype::F16,
        Dtype::BF16 => StoredDtype::BF16,
        Dtype::U8 => StoredDtype::U8,
        Dtype::I8 => StoredDtype::I8,
        Dtype::I32 => StoredDtype::I32,
        Dtype::I64 => StoredDtype::I64,
        _ => return None,
    })
}

/// Convert little-endian stored floats to f32.
pub fn to_f32(dtype: StoredDtype, bytes: &[u8], what: &str) -> Result<Vec<f32>> {
    let width = dtype.float_width().ok_or_else(|| {
        FormatError::Unsupported(format!(
            "{what}: dtype {dtype:?} cannot be used as a float weight"
        ))
    })?;
    let mut out = vec![0f32; bytes.len() / width];
    crate::floats_into(dtype, bytes, &mut out);
    Ok(out)
}

impl TensorStore for SafetensorsDir {
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        let sorted: BTreeMap<&String, ()> = self.index.keys().map(|k| (k, ())).collect();
        sorted.into_keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info(name)?.1.shape.clone())
    }

    fn f32(&self, name: &str) -> Result<F32Tensor> {
        let raw = self.raw(name)?;
        let what = format!("tensor `{name}`");
        Ok(F32Tensor {
            data: to_f32(raw.dtype, raw.data, &what)?,
            shape: raw.shape.clone(),
        })
    }

    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let (shard, info) = self.info(name)?;
        let dtype = stored_dtype(info.dtype).ok_or_else(|| {
            FormatError::Unsupported(format!(
                "{}: tensor `{name}` has unsupported dtype {:?}",
                shard.path.display(),
                info.dtype
            ))
        })?;
        let (a, b) = info.data_offsets;
        Ok(RawTensor::mapped(
            dtype,
            info.shape.clone(),
            &shard.mmap,
            shard.data_start + a..shard.data_start + b,
        ))
    }
}
