//! GGUF files (llama.cpp's format): metadata, tensor directory, dequantization, and the
//! translation to HF names and config keys that transformers' GGUF loader performs
//! (`transformers/integrations/ggml.py` GGUF_CONFIG_MAPPING and
//! `modeling_gguf_pytorch_utils.py`), so an architecture crate never sees llama.cpp names.
//!
//! Layout (little endian): magic "GGUF", version u32 (2 or 3), tensor_count u64, kv_count u64,
//! kv pairs, tensor infos (name, n_dims u32, dims u64 x n_dims, ggml type u32, offset u64), then
//! padding to `general.alignment` (default 32) and the tensor data.
//! ggml dims are innermost-first: ggml `[ne0, ne1]` is HF/PyTorch `[ne1, ne0]`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::{json, Map, Value};

use crate::{F32Tensor, FormatError, RawTensor, Result, StoredDtype, TensorStore};

/// ggml type ids (ggml.h `enum ggml_type`).
pub mod ggml_type {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q5_0: u32 = 6;
    pub const Q5_1: u32 = 7;
    pub const Q8_0: u32 = 8;
    pub const BF16: u32 = 30;
}

/// (elements per block, bytes per block) of the types we can dequantize.
fn block_layout(ty: u32) -> Option<(usize, usize)> {
    use ggml_type::*;
    Some(match ty {
        F32 => (1, 4),
        F16 => (1, 2),
        BF16 => (1, 2),
        Q4_0 => (32, 18),
        Q4_1 => (32, 20),
        Q5_0 => (32, 22),
        Q5_1 => (32, 24),
        Q8_0 => (32, 34),
        _ => return None,
    })
}

fn type_name(ty: u32) -> String {
    let known = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    known
        .get(ty as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("type {ty}"))
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U64(v) => Some(v),
            GgufValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct TensorInfo {
    /// ggml dims, innermost first.
    dims: Vec<usize>,
    ty: u32,
    /// Absolute byte offset in the file.
    offset: usize,
    nbytes: usize,
}

pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub metadata: BTreeMap<String, GgufValue>,
    /// By GGUF name.
    tensors: BTreeMap<String, TensorInfo>,
    /// HF name -> GGUF name.
    hf_names: BTreeMap<String, String>,
    /// (n_heads, n_kv_heads) for undoing llama.cpp's Q/K row permutation.
    qk_heads: Option<(usize, usize)>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn truncated(&self, what: &str) -> FormatError {
        FormatError::Corrupt(format!(
            "{} is truncated or corrupt: ran out of bytes reading {what} at offset {}",
            self.path.display(),
            self.pos
        ))
    }
    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.truncated(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(8, what)?.try_into().unwrap()))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        // Any length longer than the file is corruption (and must not drive an allocation).
        if n as usize > self.buf.len() {
            return Err(FormatError::Corrupt(format!(
                "{} is corrupt: {what} claims length {n}, larger than the file",
                self.path.display()
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| {
            FormatError::Corrupt(format!(
                "{} is corrupt: {what} is not UTF-8",
                self.path.display()
            ))
        })
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U64(self.bytes(1, what)?[0] as u64),
            1 => GgufValue::I64(self.bytes(1, what)?[0] as i8 as i64),
            2 => {
                GgufValue::U64(u16::from_le_bytes(self.bytes(2, what)?.try_into().unwrap()) as u64)
            }
            3 => {
                GgufValue::I64(i16::from_le_bytes(self.bytes(2, what)?.try_into().unwrap()) as i64)
            }
            4 => GgufValue::U64(self.u32(what)? as u64),
            5 => GgufValue::I64(self.u32(what)? as i32 as i64),
            6 => {
                GgufValue::F64(f32::from_le_bytes(self.bytes(4, what)?.try_into().unwrap()) as f64)
            }
            7 => GgufValue::Bool(self.bytes(1, what)?[0] != 0),
            8 => GgufValue::Str(self.string(what)?),
            9 if depth == 0 => {
                let elem = self.u32(what)?;
                let n = self.len(what)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(elem, what, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(self.u64(what)? as i64),
            12 => GgufValue::F64(f64::from_le_bytes(self.bytes(8, what)?.try_into().unwrap())),
            _ => {
                return Err(FormatError::Corrupt(format!(
                    "{} is corrupt: {what} has unknown value type {ty}",
                    self.path.display()
                )))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| {
            FormatError::NotFound(format!("cannot open GGUF file {}: {e}", path.display()))
        })?;
        // SAFETY: read-only mapping of a model file (see safetensors_dir::open_shard).
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|e| FormatError::Corrupt(format!("cannot map {}: {e}", path.display())))?;
        let mut r = Reader {
            buf: &mmap,
            pos: 0,
            path,
        };
        let magic = r.bytes(4, "the magic number")?;
        if magic != b"GGUF" {
            return Err(FormatError::Corrupt(format!(
                "{} is not a GGUF file (magic {:?}, expected \"GGUF\")",
                path.display(),
                String::from_utf8_lossy(magic)
            )));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(FormatError::Unsupported(format!(
                "{}: GGUF version {version} is not supported (2 and 3 are)",
                path.display()
            )));
        }
        let n_tensors = r.len("the tensor count")?;
        let n_kv = r.len("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("a metadata key")?;
            let ty = r.u32(&key)?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string("a tensor name")?;
            let n_dims = r.u32(&name)? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(FormatError::Corrupt(format!(
                    "{}: tensor `{name}` has {n_dims} dims",
                    path.display()
                )));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.len(&name)?);
            }
            let ty = r.u32(&name)?;
            let offset = r.u64(&name)? as usize;
            infos.push((name, dims, ty, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32) as usize;
        if alignment == 0 {
            return Err(FormatError::Corrupt(format!(
                "{}: general.alignment is 0",
                path.display()
            )));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in infos {
            let n: usize = dims.iter().product();
            let nbytes = match block_layout(ty) {
                Some((block, bytes)) => {
                    if dims[0] % block != 0 {
                        return Err(FormatError::Corrupt(format!(
                            "{}: tensor `{name}` row length {} is not a multiple of its block size {block}",
                            path.display(),
                            dims[0]
                        )));
                    }
                    n / block * bytes
                }
                // Unknown size: only an error if the tensor is used.
                None => 0,
            };
            let abs = data_start + offset;
            if abs + nbytes > mmap.len() {
                return Err(FormatError::Corrupt(format!(
                    "{} is truncated: tensor `{name}` needs bytes {abs}..{} but the file has {}",
                    path.display(),
                    abs + nbytes,
                    mmap.len()
                )));
            }
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    ty,
                    offset: abs,
                    nbytes,
                },
            );
        }
        let mut file = GgufFile {
            path: path.to_path_buf(),
            mmap,
            metadata,
            tensors,
            hf_names: BTreeMap::new(),
            qk_heads: None,
        };
        file.hf_names = file
            .tensors
            .keys()
            .filter_map(|g| hf_tensor_name(g).map(|h| (h, g.clone())))
            .collect();
        let arch = file.architecture()?;
        if arch == "llama" {
            let heads = file.meta_u64(&format!("{arch}.attention.head_count"))? as usize;
            let kv = file
                .metadata
                .get(&format!("{arch}.attention.head_count_kv"))
                .and_then(GgufValue::as_u64)
                .map(|v| v as usize)
                .unwrap_or(heads);
            file.qk_heads = Some((heads, kv));
        }
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn architecture(&self) -> Result<String> {
        self.meta_str("general.architecture").map(str::to_owned)
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .and_then(GgufValue::as_str)
            .ok_or_else(|| self.missing(key, "a string"))
    }

    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        self.metadata
            .get(key)
            .and_then(GgufValue::as_u64)
            .ok_or_else(|| self.missing(key, "an integer"))
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        self.metadata
            .get(key)
            .and_then(GgufValue::as_f64)
            .ok_or_else(|| self.missing(key, "a number"))
    }

    /// A string array (tokenizer.ggml.tokens, .merges).
    pub fn meta_strings(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self
            .metadata
            .get(key)
            .and_then(GgufValue::as_array)
            .ok_or_else(|| self.missing(key, "an array"))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.missing(key, "a string array"))
            })
            .collect()
    }

    /// An integer array (tokenizer.ggml.token_type).
    pub fn meta_ints(&self, key: &str) -> Result<Vec<i64>> {
        let arr = self
            .metadata
            .get(key)
            .and_then(GgufValue::as_array)
            .ok_or_else(|| self.missing(key, "an array"))?;
        arr.iter()
            .map(|v| match *v {
                GgufValue::I64(i) => Ok(i),
                GgufValue::U64(u) => Ok(u as i64),
                _ => Err(self.missing(key, "an integer array")),
            })
            .collect()
    }

    fn missing(&self, key: &str, what: &str) -> FormatError {
        FormatError::Invalid(format!(
            "{}: metadata `{key}` is missing or not {what}",
            self.path.display()
        ))
    }

    /// The config.json transformers would build from this file's metadata, with HF key names.
    /// Metadata under `<arch>.` that we do not translate is an error, never silently dropped.
    pub fn hf_config(&self) -> Result<Value> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(FormatError::Unsupported(format!(
                "{}: GGUF architecture `{arch}` is not supported (only llama GGUF files are)",
                self.path.display()
            )));
        }
        let mut c = Map::new();
        c.insert("model_type".into(), json!(arch));
        let prefix = format!("{arch}.");
        for (key, value) in &self.metadata {
            let Some(k) = key.strip_prefix(&prefix) else {
                continue;
            };
            let num = || {
                value.as_f64().ok_or_else(|| {
                    FormatError::Invalid(format!(
                        "{}: metadata `{key}` is not a number",
                        self.path.display()
                    ))
                })
            };
            match k {
                "context_length" => {
                    c.insert("max_position_embeddings".into(), json!(num()? as u64))
                }
                "block_count" => c.insert("num_hidden_layers".into(), json!(num()? as u64)),
                "feed_forward_length" => c.insert("intermediate_size".into(), json!(num()? as u64)),
                "embedding_length" => c.insert("hidden_size".into(), json!(num()? as u64)),
                "attention.head_count" => {
                    c.insert("num_attention_heads".into(), json!(num()? as u64))
                }
                "attention.head_count_kv" => {
                    c.insert("num_key_value_heads".into(), json!(num()? as u64))
                }
                "attention.layer_norm_rms_epsilon" => {
                    // Stored as f32: keep the f32 value exactly as transformers reads it.
                    c.insert("rms_norm_eps".into(), json!(num()?))
                }
                "rope.freq_base" => c.insert("rope_theta".into(), json!(num()?)),
                "vocab_size" => c.insert("vocab_size".into(), json!(num()? as u64)),
                "attention.key_length" | "attention.value_length" => {
                    c.insert("head_dim".into(), json!(num()? as u64))
                }
                // head_dim of the rotary part: must cover the whole head for llama (checked below).
                "rope.dimension_count" => {
                    c.insert("_rope_dimension_count".into(), json!(num()? as u64))
                }
                other => {
                    return Err(FormatError::Unsupported(format!(
                        "{}: GGUF metadata `{prefix}{other}` is not supported",
                        self.path.display()
                    )))
                }
            };
        }
        let heads = c.get("num_attention_heads").and_then(Value::as_u64);
        let hidden = c.get("hidden_size").and_then(Value::as_u64);
        if let (Some(h), Some(d)) = (heads, hidden) {
            let head_dim = c.get("head_dim").and_then(Value::as_u64).unwrap_or(d / h);
            c.insert("head_dim".into(), json!(head_dim));
            if let Some(rd) = c.remove("_rope_dimension_count").and_then(|v| v.as_u64()) {
                if rd != head_dim {
                    return Err(FormatError::Unsupported(format!(
                        "{}: rope.dimension_count {rd} differs from head_dim {head_dim} (partial rotary is not supported for llama)",
                        self.path.display()
                    )));
                }
            }
        }
        if self.tensors.contains_key("rope_freqs.weight") {
            // Llama 3.1 GGUFs carry the llama3 rope scaling as precomputed per-frequency factors.
            c.insert(
                "rope_scaling".into(),
                json!({"rope_type": "gguf_freq_factors"}),
            );
        }
        c.insert(
            "tie_word_embeddings".into(),
            json!(!self.tensors.contains_key("output.weight")),
        );
        for (gguf, hf) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ] {
            if let Some(v) = self.metadata.get(gguf).and_then(GgufValue::as_u64) {
                c.insert(hf.into(), json!(v));
            }
        }
        if !c.contains_key("vocab_size") {
            if let Ok(tokens) = self.meta_strings("tokenizer.ggml.tokens") {
                c.insert("vocab_size".into(), json!(tokens.len()));
            }
        }
        Ok(Value::Object(c))
    }

    fn info(&self, hf_name: &str) -> Result<(&str, &TensorInfo)> {
        let g = self
            .hf_names
            .get(hf_name)
            .map(String::as_str)
            .ok_or_else(|| {
                FormatError::Invalid(format!(
                    "{}: tensor `{hf_name}` not found",
                    self.path.display()
                ))
            })?;
        Ok((g, &self.tensors[g]))
    }

    /// GGUF type name of a tensor (for describe and errors).
    pub fn tensor_type(&self, hf_name: &str) -> Result<String> {
        Ok(type_name(self.info(hf_name)?.1.ty))
    }
}

/// llama.cpp tensor name -> HF checkpoint name (transformers' GGUF name map, llama family).
fn hf_tensor_name(g: &str) -> Option<String> {
    let fixed = match g {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        "rope_freqs.weight" => Some("rope_freqs.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = g.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantize ggml blocks to f32, as gguf-py's `quants.dequantize` does (f32 arithmetic).
pub fn dequantize(ty: u32, data: &[u8], n: usize, what: &str) -> Result<Vec<f32>> {
    use ggml_type::*;
    let mut out = Vec::with_capacity(n);
    match ty {
        F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        F16 => out.extend(data.chunks_exact(2).map(f16)),
        BF16 => out.extend(
            data.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        Q4_0 => {
            for b in data.chunks_exact(18) {
                let d = f16(&b[0..2]);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0x0F) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        Q4_1 => {
            for b in data.chunks_exact(20) {
                let d = f16(&b[0..2]);
                let m = f16(&b[2..4]);
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        Q5_0 | Q5_1 => {
            let (hdr, bs) = if ty == Q5_0 { (2, 22) } else { (4, 24) };
            for b in data.chunks_exact(bs) {
                let d = f16(&b[0..2]);
                let m = if ty == Q5_1 { f16(&b[2..4]) } else { 0.0 };
                let qh = u32::from_le_bytes(b[hdr..hdr + 4].try_into().unwrap());
                let qs = &b[hdr + 4..hdr + 20];
                let val = |j: usize, lo: u8| -> f32 {
                    // Bit j of qh is the 5th bit of element j (ggml dequantize_row_q5_0).
                    let h = (((qh >> j) & 1) << 4) as u8;
                    let q = (lo | h) as i32;
                    if ty == Q5_0 {
                        (q - 16) as f32 * d
                    } else {
                        q as f32 * d + m
                    }
                };
                for (j, &q) in qs.iter().enumerate() {
                    out.push(val(j, q & 0x0F));
                }
                for (j, &q) in qs.iter().enumerate() {
                    out.push(val(j + 16, q >> 4));
                }
            }
        }
        Q8_0 => {
            for b in data.chunks_exact(34) {
                let d = f16(&b[0..2]);
                out.extend(b[2..34].iter().map(|&q| (q as i8) as f32 * d));
            }
        }
        other => {
            return Err(FormatError::Unsupported(format!(
                "{what}: GGUF tensor type {} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 are)",
                type_name(other)
            )))
        }
    }
    debug_assert_eq!(out.len(), n);
    Ok(out)
}

/// Undo llama.cpp's `permute` of Q/K rows (convert_hf_to_gguf.py), as transformers'
/// `reverse_permute_weights` does: rows `[n_head, 2, d/2]` -> `[n_head, d/2, 2]` swapped back.
fn reverse_permute(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                // GGUF row (h, i, j) of [n_head, d/2, 2] holds HF row (h, j, i) of [n_head, 2, d/2].
                let gguf = (h * half + i) * 2 + j;
                let hf = (h * 2 + j) * half + i;
                out[hf * cols..(hf + 1) * cols]
                    .copy_from_slice(&data[gguf * cols..(gguf + 1) * cols]);
            }
        }
    }
    out
}

impl TensorStore for GgufFile {
    fn contains(&self, name: &str) -> bool {
        self.hf_names.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.hf_names.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let (_, info) = self.info(name)?;
        Ok(info.dims.iter().rev().copied().collect())
    }

    fn f32(&self, name: &str) -> Result<F32Tensor> {
        let (g, info) = self.info(name)?;
        let what = format!("{}: tensor `{g}`", self.path.display());
        if block_layout(info.ty).is_none() {
            dequantize(info.ty, &[], 0, &what)?;
        }
        let n: usize = info.dims.iter().product();
        let bytes = &self.mmap[info.offset..info.offset + info.nbytes];
        let mut data = dequantize(info.ty, bytes, n, &what)?;
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        if let Some((heads, kv_heads)) = self.qk_heads {
            let heads = if name.ends_with("self_attn.q_proj.weight") {
                Some(heads)
            } else if name.ends_with("self_attn.k_proj.weight") {
                Some(kv_heads)
            } else {
                None
            };
            if let Some(h) = heads {
                if shape.len() != 2 || !shape[0].is_multiple_of(2 * h) {
                    return Err(FormatError::Invalid(format!(
                        "{what}: shape {shape:?} does not split into {h} heads"
                    )));
                }
                data = reverse_permute(&data, shape[0], shape[1], h);
            }
        }
        Ok(F32Tensor { shape, data })
    }

    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let (_, info) = self.info(name)?;
        Ok(RawTensor::mapped(
            StoredDtype::Ggml(info.ty),
            info.dims.iter().rev().copied().collect(),
            &self.mmap,
            info.offset..info.offset + info.nbytes,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_permute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)
        // d/2 = 3: the permutation is not its own inverse (it is for d/2 = 2).
        let (rows, cols, n_head) = (12, 3, 2);
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let half = rows / n_head / 2;
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..half {
                    // permuted[h, i, j] = hf[h, j, i]
                    let dst = (h * half + i) * 2 + j;
                    let src = (h * 2 + j) * half + i;
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(reverse_permute(&gguf, rows, cols, n_head), hf);
    }

    #[test]
    fn q8_0_and_q4_1_blocks() {
        // Q8_0: d = 0.5, q = -3..28
        let mut b = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 3) as u8));
        let v = dequantize(ggml_type::Q8_0, &b, 32, "t").unwrap();
        assert_eq!(v[0], -1.5);
        assert_eq!(v[31], 14.0);
        // Q4_1: d = 2, m = -1; low nibbles are elements 0..16, high nibbles 16..32.
        let mut b = half::f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend(half::f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16).map(|i| (i as u8) | ((15 - i as u8) << 4)));
        let v = dequantize(ggml_type::Q4_1, &b, 32, "t").unwrap();
        assert_eq!(v[1], 1.0);
        assert_eq!(v[16], 29.0);
    }

    #[test]
    fn q4_0_f16_bf16_blocks() {
        // Q4_0: d = 0.5, value = (nibble - 8) * d; low nibbles first.
        let mut b = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..16).map(|i| (i as u8) | (3 << 4)));
        let v = dequantize(ggml_type::Q4_0, &b, 32, "t").unwrap();
        assert_eq!(v[0], -4.0);
        assert_eq!(v[15], 3.5);
        assert_eq!(v[16], -2.5);
        let f: Vec<u8> = [1.5f32, -2.25]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(
            dequantize(ggml_type::F16, &f, 2, "t").unwrap(),
            vec![1.5, -2.25]
        );
        let f: Vec<u8> = [1.5f32, -2.25]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(
            dequantize(ggml_type::BF16, &f, 2, "t").unwrap(),
            vec![1.5, -2.25]
        );
    }

    #[test]
    fn q5_blocks() {
        // Q5_0: element j's fifth bit is bit j of qh; value = (q - 16) * d.
        let mut b = half::f16::from_f32(1.0).to_le_bytes().to_vec();
        b.extend(0x8000_0001u32.to_le_bytes());
        b.extend([0u8; 16]);
        let v = dequantize(ggml_type::Q5_0, &b, 32, "t").unwrap();
        assert_eq!(v[0], 0.0);
        assert_eq!(v[1], -16.0);
        assert_eq!(v[31], 0.0);
    }
}
