//! NF4 4-bit weights, bit-compatible with bitsandbytes (`functional.quantize_4bit` /
//! `dequantize_4bit`, CUDA kernels `kQuantizeBlockwise` / `kDequantizeBlockwise` in
//! csrc/kernels.cu): blocks of 64 weights share an absmax; each weight is the index of the
//! nearest NF4 code of `w / absmax`; two codes per byte, the first element in the HIGH nibble.
//! With double quantization the per-block absmax values are themselves quantized: their mean is
//! subtracted (`nested_offset`) and the rest is quantized to 8-bit codes of bnb's signed dynamic
//! map in blocks of 256, each with an f32 absmax.

// The code books are written with the digits bnb prints; they parse to the same f32 bits.
#![allow(clippy::excessive_precision)]

use llm_formats::{StoredDtype, TensorStore};

use crate::error::{CoreError, Result};

/// Weights per absmax block.
pub const BLOCKSIZE: usize = 64;
/// Absmax values per nested (double-quant) block.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The NF4 code book (bnb `quant_map` for nf4).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bnb `create_dynamic_map(signed=True)`: the 8-bit code double quantization uses. Copied from
/// bnb's own serialized `nested_quant_map` (a test checks it against the fixture checkpoint).
pub const DYNAMIC_CODE: [f32; 256] = [
    -0.992968738079071,
    -0.9789062738418579,
    -0.96484375,
    -0.9507812261581421,
    -0.936718761920929,
    -0.922656238079071,
    -0.9085937738418579,
    -0.89453125,
    -0.8804687261581421,
    -0.866406261920929,
    -0.852343738079071,
    -0.8382812738418579,
    -0.82421875,
    -0.8101562261581421,
    -0.796093761920929,
    -0.782031238079071,
    -0.7679687738418579,
    -0.75390625,
    -0.7398437261581421,
    -0.725781261920929,
    -0.7117187976837158,
    -0.6976562738418579,
    -0.68359375,
    -0.6695312261581421,
    -0.655468761920929,
    -0.6414062976837158,
    -0.6273437738418579,
    -0.61328125,
    -0.5992187261581421,
    -0.585156261920929,
    -0.5710937976837158,
    -0.5570312738418579,
    -0.54296875,
    -0.5289062261581421,
    -0.5148437023162842,
    -0.500781238079071,
    -0.48671871423721313,
    -0.47265625,
    -0.4585937261581421,
    -0.44453126192092896,
    -0.43046873807907104,
    -0.4164062440395355,
    -0.40234375,
    -0.3882812261581421,
    -0.37421876192092896,
    -0.36015623807907104,
    -0.3460937440395355,
    -0.33203125,
    -0.3179687261581421,
    -0.30390626192092896,
    -0.28984373807907104,
    -0.2757812738418579,
    -0.26171875,
    -0.24765624105930328,
    -0.23359374701976776,
    -0.21953125298023224,
    -0.20546874403953552,
    -0.19140625,
    -0.17734375596046448,
    -0.16328124701976776,
    -0.14921875298023224,
    -0.13515624403953552,
    -0.12109375,
    -0.10703125596046448,
    -0.09859374910593033,
    -0.09578125923871994,
    -0.09296875447034836,
    -0.09015624970197678,
    -0.08734375238418579,
    -0.08453124761581421,
    -0.08171875774860382,
    -0.07890625298023224,
    -0.07609374821186066,
    -0.07328125089406967,
    -0.07046874612569809,
    -0.0676562562584877,
    -0.06484375149011612,
    -0.062031250447034836,
    -0.05921875312924385,
    -0.05640624836087227,
    -0.053593751043081284,
    -0.05078125,
    -0.047968748956918716,
    -0.04515625163912773,
    -0.04234374687075615,
    -0.039531249552965164,
    -0.03671875223517418,
    -0.033906251192092896,
    -0.031093750149011612,
    -0.028281250968575478,
    -0.025468749925494194,
    -0.02265625074505806,
    -0.019843751564621925,
    -0.017031250521540642,
    -0.014218750409781933,
    -0.011406250298023224,
    -0.009718749672174454,
    -0.009156249463558197,
    -0.008593750186264515,
    -0.008031249977648258,
    -0.0074687497690320015,
    -0.006906250026077032,
    -0.006343749817460775,
    -0.005781250074505806,
    -0.0052187503315508366,
    -0.0046562496572732925,
    -0.004093749914318323,
    -0.0035312497057020664,
    -0.002968749962747097,
    -0.002406249986961484,
    -0.001843750011175871,
    -0.001281249918974936,
    -0.0009437500848434865,
    -0.0008312499849125743,
    -0.0007187500596046448,
    -0.0006062500760890543,
    -0.000493750034365803,
    -0.0003812500217463821,
    -0.0002687500382307917,
    -0.00015625001105945557,
    -8.874999912222847e-05,
    -6.625000241911039e-05,
    -4.374999844003469e-05,
    -2.1249998098937795e-05,
    -7.749999895168003e-06,
    -3.250000190746505e-06,
    -5.500000384017767e-07,
    0.0,
    5.500000384017767e-07,
    3.250000190746505e-06,
    7.749999895168003e-06,
    2.1249998098937795e-05,
    4.374999844003469e-05,
    6.625000241911039e-05,
    8.874999912222847e-05,
    0.00015625001105945557,
    0.0002687500382307917,
    0.0003812500217463821,
    0.000493750034365803,
    0.0006062500760890543,
    0.0007187500596046448,
    0.0008312499849125743,
    0.0009437500848434865,
    0.001281249918974936,
    0.001843750011175871,
    0.002406249986961484,
    0.002968749962747097,
    0.0035312497057020664,
    0.004093749914318323,
    0.0046562496572732925,
    0.0052187503315508366,
    0.005781250074505806,
    0.006343749817460775,
    0.006906250026077032,
    0.0074687497690320015,
    0.008031249977648258,
    0.008593750186264515,
    0.009156249463558197,
    0.009718749672174454,
    0.011406250298023224,
    0.014218750409781933,
    0.017031250521540642,
    0.019843751564621925,
    0.02265625074505806,
    0.025468749925494194,
    0.028281250968575478,
    0.031093750149011612,
    0.033906251192092896,
    0.03671875223517418,
    0.039531249552965164,
    0.04234374687075615,
    0.04515625163912773,
    0.047968748956918716,
    0.05078125,
    0.053593751043081284,
    0.05640624836087227,
    0.05921875312924385,
    0.062031250447034836,
    0.06484375149011612,
    0.0676562562584877,
    0.07046874612569809,
    0.07328125089406967,
    0.07609374821186066,
    0.07890625298023224,
    0.08171875774860382,
    0.08453124761581421,
    0.08734375238418579,
    0.09015624970197678,
    0.09296875447034836,
    0.09578125923871994,
    0.09859374910593033,
    0.10703125596046448,
    0.12109375,
    0.13515624403953552,
    0.14921875298023224,
    0.16328124701976776,
    0.17734375596046448,
    0.19140625,
    0.20546874403953552,
    0.21953125298023224,
    0.23359374701976776,
    0.24765624105930328,
    0.26171875,
    0.2757812738418579,
    0.28984373807907104,
    0.30390626192092896,
    0.3179687261581421,
    0.33203125,
    0.3460937440395355,
    0.36015623807907104,
    0.37421876192092896,
    0.3882812261581421,
    0.40234375,
    0.4164062440395355,
    0.43046873807907104,
    0.44453126192092896,
    0.4585937261581421,
    0.47265625,
    0.48671871423721313,
    0.500781238079071,
    0.5148437023162842,
    0.5289062261581421,
    0.54296875,
    0.5570312738418579,
    0.5710937976837158,
    0.585156261920929,
    0.5992187261581421,
    0.61328125,
    0.6273437738418579,
    0.6414062976837158,
    0.655468761920929,
    0.6695312261581421,
    0.68359375,
    0.6976562738418579,
    0.7117187976837158,
    0.725781261920929,
    0.7398437261581421,
    0.75390625,
    0.7679687738418579,
    0.782031238079071,
    0.796093761920929,
    0.8101562261581421,
    0.82421875,
    0.8382812738418579,
    0.852343738079071,
    0.866406261920929,
    0.8804687261581421,
    0.89453125,
    0.9085937738418579,
    0.922656238079071,
    0.936718761920929,
    0.9507812261581421,
    0.96484375,
    0.9789062738418579,
    0.992968738079071,
    1.0,
];

/// bnb `dQuantizeNF4`'s decision thresholds (the midpoints between consecutive NF4 codes, as
/// its tree spells them), ascending.
const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_43,
    -0.234_607_4,
    -0.137_911_73,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_77,
    0.389_312_54,
    0.501_663_4,
    0.642_786_9,
    0.861_478_4,
];

/// bnb `dQuantizeNF4`: the nearest NF4 code. Its decision tree is a binary search of the sorted
/// thresholds with `x > t` at every node, so the leaf it reaches is the count of thresholds
/// below `x`; counted here without branches (a tree walk mispredicts on random weights). NaN
/// (an all-zero block scaled by 1/0) compares false everywhere: code 0, as in bnb.
pub fn quantize_nf4(x: f32) -> u8 {
    NF4_THRESHOLDS.iter().map(|&t| (x > t) as u8).sum()
}

/// [`quantize_nf4`] of `scale * block[i]` for a block, packed two codes per byte (first in the
/// high nibble). Threshold by threshold over the whole block, so the compares vectorize; the
/// counts are i32 lanes, as wide as the compares' masks (u8 counts made the compiler narrow
/// every mask: 1.8x slower with AVX2, examples/quantize_bench.rs).
#[inline(always)]
fn quantize_block(block: &[f32], scale: f32, bytes: &mut [u8]) {
    let mut scaled = [0f32; BLOCKSIZE];
    for (s, &x) in scaled.iter_mut().zip(block) {
        *s = x * scale;
    }
    let mut codes = [0i32; BLOCKSIZE];
    for &t in &NF4_THRESHOLDS {
        for (c, &x) in codes.iter_mut().zip(&scaled) {
            *c += (x > t) as i32;
        }
    }
    for (byte, pair) in bytes.iter_mut().zip(codes.chunks_exact(2)) {
        *byte = ((pair[0] << 4) | pair[1]) as u8;
    }
}

/// bnb `dQuantize<0>`: binary search of `code` (sorted, 256 entries) and round to the nearer
/// neighbour by midpoint, with bnb's exact comparisons.
pub fn quantize_dynamic(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint {
            upper_pivot as u8
        } else {
            pivot as u8
        }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint {
            lower_pivot as u8
        } else {
            pivot as u8
        }
    }
}

/// Block absmax values, as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// `bnb_4bit_use_double_quant=False`: one f32 per block.
    Plain(Vec<f32>),
    /// Double quantization: 8-bit codes of `absmax - offset` under `code`, scaled per 256 blocks.
    Double {
        codes: Vec<u8>,
        /// One per `NESTED_BLOCKSIZE` codes.
        nested_absmax: Vec<f32>,
        offset: f32,
        code: Box<[f32; 256]>,
    },
}

impl Absmax {
    /// Per-block absmax as f32: bnb `dequantize_blockwise(absmax, state2) + offset`.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
                code,
            } => codes
                .iter()
                .enumerate()
                .map(|(i, &c)| code[c as usize] * nested_absmax[i / NESTED_BLOCKSIZE] + offset)
                .collect(),
        }
    }
}

/// An NF4-quantized weight matrix `[out, in]` (row-major order of the float weight).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Weight {
    /// `out * in / 2` bytes, two codes each, the first in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    /// The 4-bit code book (bnb `quant_map`).
    pub code: [f32; 16],
    pub out_features: usize,
    pub in_features: usize,
    /// The dtype bnb dequantizes to (`quant_state.dtype`: the weight's dtype when it was
    /// quantized); dequantized values are rounded to it.
    pub dtype: WeightDtype,
}

/// Float dtypes a quantized weight came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    BF16,
    F16,
}

impl WeightDtype {
    fn round(self, v: f32) -> f32 {
        match self {
            WeightDtype::F32 => v,
            WeightDtype::BF16 => half::bf16::from_f32(v).to_f32(),
            WeightDtype::F16 => half::f16::from_f32(v).to_f32(),
        }
    }

    /// The dtype a stored tensor had (GGUF blocks are dequantized to f32, as transformers does).
    pub fn of(stored: StoredDtype) -> WeightDtype {
        match stored {
            StoredDtype::BF16 => WeightDtype::BF16,
            StoredDtype::F16 => WeightDtype::F16,
            _ => WeightDtype::F32,
        }
    }
}

/// The largest |x| of a block (NaN ignored, as `f32::max` does; 0 for an empty block). Eight
/// independent maxima, then theirs: a single running max is a chain the compiler cannot
/// vectorize (it keeps `max`'s order), these run a vector wide. Max is exact, so the order
/// changes nothing.
#[inline(always)]
fn block_absmax(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, x) in lanes.iter_mut().zip(c) {
            *m = m.max(x.abs());
        }
    }
    tail.iter()
        .chain(&lanes)
        .fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Float weights to quantize: f32 values, or a stored tensor's little-endian bytes, converted
/// to f32 a block at a time while quantizing (an 8B checkpoint is 16 GB of bf16: converting it
/// whole first would write 28 GB of f32 on one core before any quantizing starts).
#[derive(Clone, Copy)]
pub enum FloatSource<'a> {
    F32(&'a [f32]),
    /// `dtype` is F32, F16 or BF16.
    Stored {
        dtype: StoredDtype,
        bytes: &'a [u8],
    },
}

impl FloatSource<'_> {
    /// A stored tensor's bytes, if its dtype is a float one.
    pub fn stored(dtype: StoredDtype, bytes: &[u8]) -> Option<FloatSource<'_>> {
        dtype
            .float_width()
            .map(|_| FloatSource::Stored { dtype, bytes })
    }

    pub fn len(&self) -> usize {
        match *self {
            FloatSource::F32(w) => w.len(),
            FloatSource::Stored { dtype, bytes } => bytes.len() / width(dtype),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `start..start + out.len()` as f32 (exact: every stored float dtype widens to f32).
    #[inline(always)]
    fn read(&self, start: usize, out: &mut [f32]) {
        match *self {
            FloatSource::F32(w) => out.copy_from_slice(&w[start..start + out.len()]),
            FloatSource::Stored { dtype, bytes } => {
                let w = width(dtype);
                llm_formats::floats_into(dtype, &bytes[start * w..(start + out.len()) * w], out)
            }
        }
    }
}

/// Bytes per value of a [`FloatSource::Stored`] dtype (a float one, checked at construction).
fn width(dtype: StoredDtype) -> usize {
    dtype.float_width().expect("a float dtype")
}

/// kQuantizeBlockwise over consecutive blocks: weights `first_block * BLOCKSIZE..` of `w`
/// (whole blocks but maybe a short last one) into `packed` (two weights a byte) and `absmax`
/// (one per block). With AVX-512 or AVX2 where the host has them: the builds target baseline
/// x86-64 (SSE2, 4 lanes), and this loop is what a quantize-on-load spends its time in
/// (`examples/quantize_bench.rs`, docs/benchmarks.md).
fn quantize_blocks(w: FloatSource, first_block: usize, packed: &mut [u8], absmax: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the host has AVX-512 F (checked just above).
            return unsafe { quantize_blocks_avx512(w, first_block, packed, absmax) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the host has AVX2 (checked just above).
            return unsafe { quantize_blocks_avx2(w, first_block, packed, absmax) };
        }
    }
    quantize_blocks_body(w, first_block, packed, absmax, quantize_block)
}

/// [`quantize_blocks_body`] compiled for AVX2 (its callees are `inline(always)`, so they are
/// compiled for it too).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_blocks_avx2(
    w: FloatSource,
    first_block: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    quantize_blocks_body(w, first_block, packed, absmax, quantize_block)
}

/// [`quantize_blocks_body`] compiled for AVX-512, whole blocks coded by
/// [`quantize_block_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_blocks_avx512(
    w: FloatSource,
    first_block: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    quantize_blocks_body(w, first_block, packed, absmax, |block, scale, bytes| {
        if block.len() == BLOCKSIZE {
            // SAFETY: this function runs only where the host has AVX-512 F.
            unsafe { quantize_block_avx512(block, scale, bytes) }
        } else {
            quantize_block(block, scale, bytes)
        }
    })
}

/// [`quantize_block`] of a whole block, 16 weights at a time: bnb's decision tree itself (four
/// levels of `x > t`; [`quantize_nf4`] counts the same leaf), where counting all 15
/// thresholds takes four times the instructions. The 15 thresholds fit one register, so each
/// lane fetches the threshold of its node with one permute per level.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block_avx512(block: &[f32], scale: f32, bytes: &mut [u8]) {
    use std::arch::x86_64::*;
    assert!(block.len() == BLOCKSIZE && bytes.len() == BLOCKSIZE / 2);
    let t = &NF4_THRESHOLDS;
    // Lane 15 is never fetched (the deepest node of the last level is 14).
    let thresholds = _mm512_setr_ps(
        t[0],
        t[1],
        t[2],
        t[3],
        t[4],
        t[5],
        t[6],
        t[7],
        t[8],
        t[9],
        t[10],
        t[11],
        t[12],
        t[13],
        t[14],
        f32::INFINITY,
    );
    let scale = _mm512_set1_ps(scale);
    let [one, two, three, four, eight] = [1, 2, 3, 4, 8].map(|v| _mm512_set1_epi32(v));
    for (i, out) in bytes.chunks_exact_mut(8).enumerate() {
        // SAFETY: values 16 * i .. 16 * i + 16 <= BLOCKSIZE (4 pieces of 8 bytes: asserted).
        let x = _mm512_mul_ps(_mm512_loadu_ps(block.as_ptr().add(16 * i)), scale);
        // `_CMP_GT_OQ` is false for NaN, as bnb's `x > t`: a NaN lane stays on code 0.
        let above = |node: __m512i| {
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_permutexvar_ps(node, thresholds))
        };
        let node = _mm512_maskz_mov_epi32(above(_mm512_set1_epi32(7)), eight);
        let node = _mm512_mask_add_epi32(node, above(_mm512_add_epi32(node, three)), node, four);
        let node = _mm512_mask_add_epi32(node, above(_mm512_add_epi32(node, one)), node, two);
        let code = _mm512_mask_add_epi32(node, above(node), node, one);
        // Pairs of lanes to bytes: (even << 4) | odd, the low byte of each 64-bit lane.
        let pairs = _mm512_or_si512(_mm512_slli_epi32(code, 4), _mm512_srli_epi64(code, 32));
        let packed = _mm512_cvtepi64_epi8(pairs);
        // SAFETY: `out` is 8 bytes; the low 8 bytes of `packed` are stored.
        _mm_storel_epi64(out.as_mut_ptr().cast(), packed);
    }
}

#[inline(always)]
fn quantize_blocks_body(
    w: FloatSource,
    first_block: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    quantize_block: impl Fn(&[f32], f32, &mut [u8]),
) {
    let mut buf = [0f32; BLOCKSIZE];
    for (i, (bytes, absmax)) in packed
        .chunks_mut(BLOCKSIZE / 2)
        .zip(absmax.iter_mut())
        .enumerate()
    {
        let block = &mut buf[..bytes.len() * 2];
        w.read((first_block + i) * BLOCKSIZE, block);
        let a = block_absmax(block);
        *absmax = a;
        // bnb stores 1/absmax and multiplies.
        quantize_block(block, 1.0f32 / a, bytes);
    }
}

/// Split `n` items over the host's cores, at least `min` per thread: the chunk length.
fn per_thread(n: usize, min: usize) -> usize {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    n.div_ceil(threads).max(min)
}

/// The second quantization of consecutive nested blocks: `absmax - mean` in blocks of
/// [`NESTED_BLOCKSIZE`] to 8-bit codes of bnb's dynamic map, one f32 absmax per block.
fn double_quantize(absmax: &[f32], mean: f32, codes: &mut [u8], nested: &mut [f32]) {
    let mut centered = [0f32; NESTED_BLOCKSIZE];
    for ((block, codes), nested) in absmax
        .chunks(NESTED_BLOCKSIZE)
        .zip(codes.chunks_mut(NESTED_BLOCKSIZE))
        .zip(nested.iter_mut())
    {
        let centered = &mut centered[..block.len()];
        for (c, &a) in centered.iter_mut().zip(block) {
            *c = a - mean;
        }
        let a = block_absmax(centered);
        *nested = a;
        let scale = 1.0f32 / a;
        for (code, &v) in codes.iter_mut().zip(centered.iter()) {
            *code = quantize_dynamic(&DYNAMIC_CODE, v * scale);
        }
    }
}

impl Nf4Weight {
    /// Quantize a float weight `[out, in]` the way `bnb.functional.quantize_4bit(w,
    /// blocksize=64, compress_statistics=double_quant, quant_type="nf4")` does.
    pub fn quantize(
        w: &[f32],
        out_features: usize,
        in_features: usize,
        double_quant: bool,
        dtype: WeightDtype,
    ) -> Nf4Weight {
        Self::quantize_from(
            FloatSource::F32(w),
            out_features,
            in_features,
            double_quant,
            dtype,
        )
    }

    /// [`Nf4Weight::quantize`] reading the weights from `w` (f32 or stored bytes).
    pub fn quantize_from(
        w: FloatSource,
        out_features: usize,
        in_features: usize,
        double_quant: bool,
        dtype: WeightDtype,
    ) -> Nf4Weight {
        assert_eq!(w.len(), out_features * in_features);
        assert!(w.len().is_multiple_of(2), "odd number of weights");
        let mut packed = vec![0u8; w.len() / 2];
        let mut absmax = vec![0f32; w.len().div_ceil(BLOCKSIZE)];
        // Blocks are independent: split them over the host's cores (an 8B model has 7e9
        // weights; one core takes minutes). Each thread reads its own blocks' source bytes and
        // writes their packed bytes and absmax.
        let blocks_per_thread = per_thread(absmax.len(), 1024);
        std::thread::scope(|scope| {
            for (i, (packed, absmax)) in packed
                .chunks_mut(blocks_per_thread * BLOCKSIZE / 2)
                .zip(absmax.chunks_mut(blocks_per_thread))
                .enumerate()
            {
                scope.spawn(move || quantize_blocks(w, i * blocks_per_thread, packed, absmax));
            }
        });
        let absmax = if double_quant {
            // offset = absmax.mean() (f32 result of a sum; computed in f64 here: bnb's GPU
            // reduction order differs in the last bit now and then, which can move a code by one).
            let mean = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
            let mut codes = vec![0u8; absmax.len()];
            let mut nested_absmax = vec![0f32; absmax.len().div_ceil(NESTED_BLOCKSIZE)];
            // Nested blocks are independent too (an 8B model has 1.1e8 absmax values, each a
            // binary search of the dynamic map).
            let nested_per_thread = per_thread(nested_absmax.len(), 64);
            std::thread::scope(|scope| {
                for ((absmax, codes), nested) in absmax
                    .chunks(nested_per_thread * NESTED_BLOCKSIZE)
                    .zip(codes.chunks_mut(nested_per_thread * NESTED_BLOCKSIZE))
                    .zip(nested_absmax.chunks_mut(nested_per_thread))
                {
                    scope.spawn(move || double_quantize(absmax, mean, codes, nested));
                }
            });
            Absmax::Double {
                codes,
                nested_absmax,
                offset: mean,
                code: Box::new(DYNAMIC_CODE),
            }
        } else {
            Absmax::Plain(absmax)
        };
        Nf4Weight {
            packed,
            absmax,
            code: NF4_CODE,
            out_features,
            in_features,
            dtype,
        }
    }

    /// Whether `key` (e.g. `model.layers.0.mlp.down_proj.weight`) is stored in bnb's 4-bit
    /// serialized form.
    pub fn is_bnb(store: &dyn TensorStore, key: &str) -> bool {
        store.contains(&format!("{key}.quant_state.bitsandbytes__nf4"))
            || store.contains(&format!("{key}.quant_state.bitsandbytes__fp4"))
    }

    /// Read a pre-quantized bnb weight (`W.weight`, `.absmax`, `.quant_map`, `.nested_absmax`,
    /// `.nested_quant_map`, `.quant_state.bitsandbytes__nf4`) as transformers saves it.
    pub fn from_bnb(
        store: &dyn TensorStore,
        key: &str,
        out_features: usize,
        in_features: usize,
        what: &str,
    ) -> Result<Nf4Weight> {
        let bad = |m: String| CoreError::invalid(format!("{what}: `{key}`: {m}"));
        if store.contains(&format!("{key}.quant_state.bitsandbytes__fp4")) {
            return Err(CoreError::unimplemented(format!(
                "{what}: `{key}` is bnb FP4; only NF4 is supported"
            )));
        }
        let state_raw = store.raw(&format!("{key}.quant_state.bitsandbytes__nf4"))?;
        let state: serde_json::Value = serde_json::from_slice(state_raw.data)
            .map_err(|e| bad(format!("quant_state is not JSON: {e}")))?;
        let blocksize = state["blocksize"].as_u64().unwrap_or(0) as usize;
        if blocksize != BLOCKSIZE {
            return Err(CoreError::unimplemented(format!(
                "{what}: `{key}`: blocksize {blocksize} (only {BLOCKSIZE} is supported)"
            )));
        }
        let shape: Vec<usize> = state["shape"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64().map(|x| x as usize))
                    .collect()
            })
            .unwrap_or_default();
        if shape != [out_features, in_features] {
            return Err(bad(format!(
                "quant_state shape {shape:?}, the config implies [{out_features}, {in_features}]"
            )));
        }
        let bytes = |name: &str, dtype: StoredDtype| -> Result<Vec<u8>> {
            let t = store.raw(&format!("{key}.{name}"))?;
            if t.dtype != dtype {
                return Err(bad(format!(
                    "`{name}` is {:?}, expected {dtype:?}",
                    t.dtype
                )));
            }
            Ok(t.data.to_vec())
        };
        let floats = |name: &str| -> Result<Vec<f32>> {
            Ok(bytes(name, StoredDtype::F32)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let n = out_features * in_features;
        let nblocks = n.div_ceil(BLOCKSIZE);
        let packed = store.raw(key)?;
        if packed.data.len() != n / 2 {
            return Err(bad(format!(
                "{} packed bytes, expected {}",
                packed.data.len(),
                n / 2
            )));
        }
        let packed = packed.data.to_vec();
        let qm = floats("absmax.quant_map").or_else(|_| floats("quant_map"))?;
        let code: [f32; 16] = qm.try_into().map_err(|v: Vec<f32>| {
            bad(format!("quant_map has {} entries, expected 16", v.len()))
        })?;
        let nested = state.get("nested_offset").and_then(|v| v.as_f64());
        let absmax = match nested {
            Some(offset) => {
                let codes = bytes("absmax", StoredDtype::U8)?;
                if codes.len() != nblocks {
                    return Err(bad(format!(
                        "{} absmax codes, expected {nblocks}",
                        codes.len()
                    )));
                }
                let nested_absmax = floats("nested_absmax")?;
                if nested_absmax.len() != nblocks.div_ceil(NESTED_BLOCKSIZE) {
                    return Err(bad(format!("{} nested absmax values", nested_absmax.len())));
                }
                let ncode: [f32; 256] =
                    floats("nested_quant_map")?
                        .try_into()
                        .map_err(|v: Vec<f32>| {
                            bad(format!("nested_quant_map has {} entries", v.len()))
                        })?;
                Absmax::Double {
                    codes,
                    nested_absmax,
                    offset: offset as f32,
                    code: Box::new(ncode),
                }
            }
            None => {
                let a = floats("absmax")?;
                if a.len() != nblocks {
                    return Err(bad(format!(
                        "{} absmax values, expected {nblocks}",
                        a.len()
                    )));
                }
                Absmax::Plain(a)
            }
        };
        let dtype = match state["dtype"].as_str() {
            Some("bfloat16") => WeightDtype::BF16,
            Some("float16") => WeightDtype::F16,
            Some("float32") => WeightDtype::F32,
            other => return Err(bad(format!("quant_state dtype {other:?} is not supported"))),
        };
        Ok(Nf4Weight {
            packed,
            absmax,
            code,
            out_features,
            in_features,
            dtype,
        })
    }

    /// Per-block absmax as f32: bnb `dequantize_blockwise(absmax, state2) + offset`.
    pub fn absmax_f32(&self) -> Vec<f32> {
        self.absmax.to_f32()
    }

    /// Dequantize rows `rows` into `out` (`rows.len() * in_features` values), given
    /// [`Self::absmax_f32`]. `code[nibble] * absmax` in f32, rounded to bf16 when bnb would.
    pub fn dequantize_rows(&self, absmax: &[f32], rows: std::ops::Range<usize>, out: &mut [f32]) {
        let k = self.in_features;
        let (start, end) = (rows.start * k, rows.end * k);
        debug_assert_eq!(out.len(), end - start);
        // Walk whole bytes where possible: two weights per byte, one absmax per 64 weights.
        let mut i = start;
        let mut o = 0;
        if i % 2 == 1 {
            out[o] = self
                .dtype
                .round(self.code[(self.packed[i / 2] & 0x0F) as usize] * absmax[i / BLOCKSIZE]);
            i += 1;
            o += 1;
        }
        while i + 1 < end {
            let byte = self.packed[i / 2];
            let a = absmax[i / BLOCKSIZE];
            out[o] = self.dtype.round(self.code[(byte >> 4) as usize] * a);
            out[o + 1] = self.dtype.round(self.code[(byte & 0x0F) as usize] * a);
            i += 2;
            o += 2;
        }
        if i < end {
            out[o] = self
                .dtype
                .round(self.code[(self.packed[i / 2] >> 4) as usize] * absmax[i / BLOCKSIZE]);
        }
    }

    /// The whole matrix as f32 `[out, in]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.out_features * self.in_features];
        self.dequantize_rows(&self.absmax_f32(), 0..self.out_features, &mut out);
        out
    }

    /// Bytes held, counted as the serialized checkpoint stores them: packed codes, absmax (codes
    /// + nested f32 scales, or f32), and the two code books.
    pub fn stored_bytes(&self) -> usize {
        self.packed.len()
            + 16 * 4
            + match &self.absmax {
                Absmax::Plain(a) => a.len() * 4,
                Absmax::Double {
                    codes,
                    nested_absmax,
                    ..
                } => codes.len() + nested_absmax.len() * 4 + 256 * 4,
            }
    }
}

/// Rows per tile of the device's code layout ([`tile_codes`]).
const TILE_ROWS: usize = 16;

/// Where byte `byte` of row `row`'s packed codes (`k` weights per row) sits in the tiled
/// layout [`tile_codes`] makes: per group of 16 rows, per window of 128 weights, a 1 KiB tile
/// of the 16 rows' 64 bytes one after the other (the last window 64 weights wide when `k` is
/// an odd multiple of 64: 32 bytes per row); groups and windows in order.
pub fn tiled_byte(row: usize, byte: usize, k: usize) -> usize {
    let (window, within) = (byte / 64, byte % 64);
    let width = if window < k / 128 { 64 } else { 32 };
    row / TILE_ROWS * TILE_ROWS * (k / 2)
        + window * TILE_ROWS * 64
        + row % TILE_ROWS * width
        + within
}

/// Row-major packed codes (`n` rows of `k / 2` bytes, `k` a multiple of 64) in the CUDA
/// kernels' tiled layout ([`tiled_byte`]), the last group of rows padded with zero bytes to 16.
///
/// Why: the tensor-core GEMVs (`nf4_gemv_tc.cu`, `nf4_mma`) give lane (g, t) of a warp the
/// 16 bytes at `16 t` of a 128-wide window of row g (the MMA fragment's rows). In the row-major
/// layout a warp's load spans 8 rows x 64 bytes; here it is 512 contiguous bytes in lane order,
/// so each quarter warp (whose 8 lanes a 16-byte load serves at once) reads one 128-byte line,
/// and a window's 16 rows are one kilobyte. docs/benchmarks.md, run 26: the one-token GEMV at
/// 4096x14336 14.2 us (13.6 timing the same addresses in another process) against 14.7-15.0
/// on row-major codes and 14.8-15.0 on tiles of 8 or 16 rows x 64 weights, where a quarter
/// warp's lanes span two lines.
pub fn tile_codes(packed: &[u8], n: usize, k: usize) -> Vec<u8> {
    assert!(
        k.is_multiple_of(BLOCKSIZE) && packed.len() == n * k / 2,
        "NF4 codes [n, k / 2]"
    );
    let mut out = vec![0u8; tiled_len(n, k)];
    // A row's bytes of one window stay together: copied as runs of up to 64.
    for (row, codes) in packed.chunks_exact(k / 2).enumerate() {
        for (window, run) in codes.chunks(64).enumerate() {
            let at = tiled_byte(row, window * 64, k);
            out[at..at + run.len()].copy_from_slice(run);
        }
    }
    out
}

/// Where the absmax of block `block` of row `row` sits in the device's absmax layout
/// [`tile_absmax`]: where the block's first code byte sits in the tiled codes, over 32 (a
/// block is 32 bytes), so a kernel holding a code word's index `w` finds its absmax at `w / 8`.
pub fn tiled_block(row: usize, block: usize, k: usize) -> usize {
    tiled_byte(row, 32 * block, k) / 32
}

/// Per-block absmax (`n` rows of `k / 64`, row-major) in the order of the tiled codes
/// ([`tiled_block`]): per 16 rows and window of 128 weights, the 16 rows' two absmax one after
/// the other (one in a last window of 64), rows padded to 16 with zeros.
///
/// Why: the one-token tensor-core GEMV (`nf4_gemv_tc.cu`) loads a window's absmax for 8 rows
/// per warp load; row-major, those are 8 scattered 8-byte pieces (`k / 16` bytes apart), tiled
/// one 64-byte run. docs/benchmarks.md, run 27: 13.6 us against 14.2-14.4 at 4096x14336.
pub fn tile_absmax(absmax: &[f32], n: usize, k: usize) -> Vec<f32> {
    let blocks = k / BLOCKSIZE;
    assert!(
        k.is_multiple_of(BLOCKSIZE) && absmax.len() == n * blocks,
        "absmax [n, k / 64]"
    );
    let mut out = vec![0.0; tiled_len(n, k) / 32];
    for (row, a) in absmax.chunks_exact(blocks).enumerate() {
        for (block, &v) in a.iter().enumerate() {
            out[tiled_block(row, block, k)] = v;
        }
    }
    out
}

/// Bytes of `n` rows of `k` codes in the tiled layout ([`tile_codes`]): rows padded to 16.
pub fn tiled_len(n: usize, k: usize) -> usize {
    n.next_multiple_of(TILE_ROWS) * k / 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_formats::SafetensorsDir;

    fn f32s(store: &SafetensorsDir, name: &str) -> Vec<f32> {
        store.f32(name).unwrap().data
    }

    /// The tiled layout moves every byte where `tiled_byte` says (rows not a multiple of 16:
    /// the padding is zeros), and the tensor-core GEMV's loads (lane l = 4 g + t of a warp, 16
    /// bytes at `16 t` of a 128-wide window of rows g, then g + 8) read 512 contiguous bytes in
    /// lane order.
    #[test]
    fn tiled_codes_put_each_byte_where_the_kernels_read_it() {
        for (n, k) in [(16, 128), (13, 192), (40, 576), (32, 256)] {
            let packed: Vec<u8> = (0..n * k / 2).map(|i| (i * 7 + i / 251) as u8).collect();
            let tiled = tile_codes(&packed, n, k);
            assert_eq!(tiled.len(), n.next_multiple_of(16) * k / 2);
            let mut seen = vec![false; tiled.len()];
            for row in 0..n {
                for byte in 0..k / 2 {
                    let at = tiled_byte(row, byte, k);
                    assert_eq!(
                        tiled[at],
                        packed[row * k / 2 + byte],
                        "row {row} byte {byte}"
                    );
                    assert!(!std::mem::replace(&mut seen[at], true), "{at} twice");
                }
            }
            assert!(
                seen.iter().zip(&tiled).all(|(&s, &b)| s || b == 0),
                "padding"
            );
            for group in 0..n / 16 {
                for window in 0..k / 128 {
                    let first = tiled_byte(16 * group, window * 64, k);
                    for h in 0..2 {
                        for lane in 0..32 {
                            let (g, t) = (lane / 4, lane % 4);
                            let at = tiled_byte(16 * group + 8 * h + g, window * 64 + 16 * t, k);
                            assert_eq!(at, first + 512 * h + 16 * lane);
                        }
                    }
                }
            }
        }
    }

    /// The tiled absmax moves every block's absmax to its first code byte's place over 32
    /// (rows not a multiple of 16: zeros), and a window's absmax of a tile's 16 rows are 32
    /// consecutive floats (16 in a last window of 64 weights): rows g and g + 8 of the
    /// tensor-core GEMV's lane (g, t) at `2 g`, `2 g + 16` from the window's first.
    #[test]
    fn tiled_absmax_follows_the_tiled_codes() {
        for (n, k) in [(16, 128), (13, 192), (40, 576), (32, 256)] {
            let blocks = k / 64;
            let absmax: Vec<f32> = (0..n * blocks).map(|i| 1.0 + i as f32).collect();
            let tiled = tile_absmax(&absmax, n, k);
            assert_eq!(tiled.len(), n.next_multiple_of(16) * blocks);
            let mut seen = vec![false; tiled.len()];
            for row in 0..n {
                for block in 0..blocks {
                    let at = tiled_block(row, block, k);
                    assert_eq!(at * 32, tiled_byte(row, 32 * block, k));
                    assert_eq!(
                        tiled[at],
                        absmax[row * blocks + block],
                        "row {row} block {block}"
                    );
                    assert!(!std::mem::replace(&mut seen[at], true), "{at} twice");
                }
            }
            assert!(
                seen.iter().zip(&tiled).all(|(&s, &a)| s || a == 0.0),
                "padding"
            );
            for group in 0..n / 16 {
                for window in 0..blocks / 2 {
                    let first = tiled_block(16 * group, 2 * window, k);
                    assert_eq!(first, (16 * group) * blocks + 32 * window);
                    for g in 0..8 {
                        for (h, b) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                            let at = tiled_block(16 * group + 8 * h + g, 2 * window + b, k);
                            assert_eq!(at, first + 16 * h + 2 * g + b);
                        }
                    }
                }
            }
        }
    }

    /// `values` as a checkpoint stores them in `dtype` (BF16, F16 or F32), little-endian.
    fn stored(values: &[f32], dtype: StoredDtype) -> Vec<u8> {
        match dtype {
            StoredDtype::BF16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            StoredDtype::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            _ => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        }
    }

    /// The quantizer compiled for AVX2 and for AVX-512 (what a load runs on an x86-64 host that
    /// has them: the CI machine and the GPU machine have both) and for the baseline target give
    /// the same bytes: bf16, f16 and f32 sources, an all-zero block (1/0 scale: NaN codes 0),
    /// NaN and infinite weights, a short last block, and a block whose scaled values are the 15
    /// decision thresholds themselves and their neighbours (`x > t` at the boundary), where
    /// the codes also equal [`quantize_nf4`]'s.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn quantizer_with_avx2_and_avx512_equals_baseline() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut values: Vec<f32> = (0..64 * 517 + 38)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * (1 + i / 64 % 5) as f32
            })
            .collect();
        values[64..128].fill(0.0);
        values[200] = f32::NAN;
        values[300] = f32::INFINITY;
        values[400] = -0.0;
        // Block 8: absmax 1 (scale exactly 1), every threshold, one ulp either side of it.
        let edges = NF4_THRESHOLDS
            .iter()
            .flat_map(|t| [t.next_down(), *t, t.next_up()])
            .chain([1.0, -1.0]);
        for (v, e) in values[512..576].iter_mut().zip(edges.cycle()) {
            *v = e;
        }
        assert!(
            std::arch::is_x86_feature_detected!("avx2"),
            "an x86-64 host without AVX2: the AVX2 quantizer cannot be checked here"
        );
        // The CI machine and the GPU machine have AVX-512; a host without it never runs that
        // quantizer, and says so here.
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        if !avx512 {
            eprintln!("this host has no AVX-512 F: its quantizer is not checked here");
        }
        for dtype in [StoredDtype::BF16, StoredDtype::F16, StoredDtype::F32] {
            let bytes = stored(&values, dtype);
            let src = FloatSource::stored(dtype, &bytes).unwrap();
            let blocks = values.len().div_ceil(BLOCKSIZE);
            let run = |isa: &str| {
                let mut packed = vec![0u8; values.len() / 2];
                let mut absmax = vec![0f32; blocks];
                // SAFETY: the host has AVX2 (asserted above), and AVX-512 F where it runs.
                match isa {
                    "avx2" => unsafe { quantize_blocks_avx2(src, 0, &mut packed, &mut absmax) },
                    "avx512" => unsafe { quantize_blocks_avx512(src, 0, &mut packed, &mut absmax) },
                    _ => quantize_blocks_body(src, 0, &mut packed, &mut absmax, quantize_block),
                }
                (
                    packed,
                    absmax.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                )
            };
            let baseline = run("baseline");
            assert_eq!(baseline.1[1], 0, "{dtype:?}: the zero block's absmax");
            assert!(baseline.0[32..64].iter().all(|&b| b == 0), "{dtype:?}");
            if dtype == StoredDtype::F32 {
                let codes: Vec<u8> = baseline.0[256..288]
                    .iter()
                    .flat_map(|b| [b >> 4, b & 15])
                    .collect();
                let want: Vec<u8> = values[512..576].iter().map(|&v| quantize_nf4(v)).collect();
                assert_eq!(codes, want, "the threshold block");
                assert!(want.windows(3).any(|w| w[0] == w[1] && w[1] + 1 == w[2]));
            }
            assert_eq!(run("avx2"), baseline, "{dtype:?}, AVX2");
            if avx512 {
                assert_eq!(run("avx512"), baseline, "{dtype:?}, AVX-512");
            }
        }
    }

    /// Stored bytes quantized block by block on all cores give the same codes and absmax as the
    /// f32 values quantized on one thread (the split over threads, and the conversion per block,
    /// change nothing). 2.4M weights: several threads' worth of blocks and of nested blocks.
    #[test]
    fn quantizing_stored_bytes_on_all_cores_equals_one_thread_on_f32() {
        let (out, inp) = (1024, 2304);
        // A deterministic spread of magnitudes (LCG), blocks with very different absmax.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let values: Vec<f32> = (0..out * inp)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * (1 + i / 64 % 7) as f32
            })
            .collect();
        for dtype in [StoredDtype::BF16, StoredDtype::F16, StoredDtype::F32] {
            let bytes = stored(&values, dtype);
            let wd = WeightDtype::of(dtype);
            let src = FloatSource::stored(dtype, &bytes).unwrap();
            let got = Nf4Weight::quantize_from(src, out, inp, true, wd);
            // One thread over the converted f32 values.
            let mut f = vec![0f32; out * inp];
            src.read(0, &mut f);
            let mut packed = vec![0u8; f.len() / 2];
            let mut absmax = vec![0f32; f.len() / BLOCKSIZE];
            quantize_blocks(FloatSource::F32(&f), 0, &mut packed, &mut absmax);
            let mean = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
            let mut codes = vec![0u8; absmax.len()];
            let mut nested = vec![0f32; absmax.len() / NESTED_BLOCKSIZE];
            double_quantize(&absmax, mean, &mut codes, &mut nested);
            assert_eq!(got.packed, packed, "{dtype:?}: packed codes");
            match &got.absmax {
                Absmax::Double {
                    codes: c,
                    nested_absmax,
                    offset,
                    ..
                } => {
                    assert_eq!(*offset, mean);
                    assert_eq!(*c, codes, "{dtype:?}: absmax codes");
                    assert_eq!(*nested_absmax, nested, "{dtype:?}: nested absmax");
                }
                other => panic!("expected double quantization, got {other:?}"),
            }
        }
    }

    #[test]
    fn code_books_equal_bnb_serialized_ones() {
        let st = SafetensorsDir::open(&crate::testing::fixtures().join("tiny/llama/nf4")).unwrap();
        let key = "model.layers.0.mlp.down_proj.weight";
        assert_eq!(f32s(&st, &format!("{key}.quant_map")), NF4_CODE.to_vec());
        assert_eq!(
            f32s(&st, &format!("{key}.nested_quant_map")),
            DYNAMIC_CODE.to_vec()
        );
    }

    /// The quantizer against bitsandbytes' own output for all five tiny architectures.
    #[test]
    fn quantize_on_load_equals_bnb_byte_for_byte() {
        for arch in ["llama", "phi3", "gemma2", "qwen2", "mixtral"] {
            let dir = crate::testing::fixtures().join("tiny").join(arch);
            let float = SafetensorsDir::open(&dir.join("bf16")).unwrap();
            let bnb = SafetensorsDir::open(&dir.join("nf4")).unwrap();
            let keys: Vec<String> = bnb
                .names()
                .into_iter()
                .filter_map(|n| {
                    n.strip_suffix(".quant_state.bitsandbytes__nf4")
                        .map(str::to_owned)
                })
                .collect();
            assert!(
                !keys.is_empty(),
                "{arch}: no quantized weights in the fixture"
            );
            let (mut blocks, mut off_by_one) = (0usize, 0usize);
            for key in &keys {
                let w = float.f32(key).unwrap();
                let (out, inp) = (w.shape[0], w.shape[1]);
                let ours = Nf4Weight::quantize(&w.data, out, inp, true, WeightDtype::BF16);
                let theirs = Nf4Weight::from_bnb(&bnb, key, out, inp, arch).unwrap();
                assert_eq!(
                    ours.packed, theirs.packed,
                    "{arch} {key}: packed NF4 codes differ"
                );
                let (
                    Absmax::Double {
                        codes: a,
                        nested_absmax: na,
                        offset: oa,
                        ..
                    },
                    Absmax::Double {
                        codes: b,
                        nested_absmax: nb,
                        offset: ob,
                        ..
                    },
                ) = (&ours.absmax, &theirs.absmax)
                else {
                    panic!("{arch} {key}: not double-quantized");
                };
                assert!(
                    (oa - ob).abs() <= 1e-6 * ob.abs(),
                    "{arch} {key}: offset {oa} vs {ob}"
                );
                for (x, y) in na.iter().zip(nb) {
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs(),
                        "{arch} {key}: nested absmax {x} vs {y}"
                    );
                }
                for (x, y) in a.iter().zip(b) {
                    blocks += 1;
                    match x.abs_diff(*y) {
                        0 => {}
                        1 => off_by_one += 1,
                        d => panic!("{arch} {key}: absmax code off by {d}"),
                    }
                }
            }
            assert!(
                off_by_one * 100 < blocks,
                "{arch}: {off_by_one} of {blocks} absmax codes one step off"
            );
        }
    }

    /// bnb `dQuantizeNF4` as written (csrc/kernels.cu): the midpoint decision tree.
    #[allow(clippy::collapsible_else_if)]
    fn quantize_nf4_tree(x: f32) -> u8 {
        if x > 0.039_790_15 {
            if x > 0.389_312_54 {
                if x > 0.642_786_9 {
                    if x > 0.861_478_4 {
                        0b1111
                    } else {
                        0b1110
                    }
                } else if x > 0.501_663_4 {
                    0b1101
                } else {
                    0b1100
                }
            } else if x > 0.203_521_25 {
                if x > 0.292_013_77 {
                    0b1011
                } else {
                    0b1010
                }
            } else if x > 0.120_255_25 {
                0b1001
            } else {
                0b1000
            }
        } else if x > -0.339_679_43 {
            if x > -0.137_911_73 {
                if x > -0.045_525_018 {
                    0b0111
                } else {
                    0b0110
                }
            } else if x > -0.234_607_4 {
                0b0101
            } else {
                0b0100
            }
        } else if x > -0.610_632_9 {
            if x > -0.459_995_27 {
                0b0011
            } else {
                0b0010
            }
        } else if x > -0.848_096_4 {
            0b0001
        } else {
            0b0000
        }
    }

    /// The branchless count reaches the tree's leaf for every input: a dense sweep, each
    /// threshold and its neighbouring floats, infinities and NaN.
    #[test]
    fn nf4_count_equals_bnb_tree() {
        let mut xs: Vec<f32> = (-300_000..=300_000).map(|i| i as f32 / 250_000.0).collect();
        for &t in &NF4_THRESHOLDS {
            xs.extend([
                t,
                f32::from_bits(t.to_bits() - 1),
                f32::from_bits(t.to_bits() + 1),
            ]);
        }
        xs.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0]);
        for x in xs {
            assert_eq!(quantize_nf4(x), quantize_nf4_tree(x), "{x}");
        }
        let block: Vec<f32> = (0..BLOCKSIZE).map(|i| (i as f32 - 31.5) / 40.0).collect();
        let mut bytes = [0u8; BLOCKSIZE / 2];
        quantize_block(&block, 1.3, &mut bytes);
        for (j, byte) in bytes.iter().enumerate() {
            let hi = quantize_nf4_tree(block[2 * j] * 1.3);
            let lo = quantize_nf4_tree(block[2 * j + 1] * 1.3);
            assert_eq!(*byte, (hi << 4) | lo, "byte {j}");
        }
    }

    #[test]
    fn nf4_tree_is_nearest_code() {
        for i in -1000..=1000 {
            let x = i as f32 / 1000.0;
            let q = quantize_nf4(x) as usize;
            let best = (0..16)
                .min_by(|&a, &b| (NF4_CODE[a] - x).abs().total_cmp(&(NF4_CODE[b] - x).abs()))
                .unwrap();
            assert!(
                (NF4_CODE[q] - x).abs() <= (NF4_CODE[best] - x).abs() + 1e-6,
                "{x}: {q} vs {best}"
            );
        }
    }
}
