//! The CPU linear layer: weights in host memory, `x W^T` as one dot product per output element.
//!
//! Why not Burn's matmul on ndarray: `matrixmultiply` packs both operands on every call, so a
//! decode step (one token row) copies every weight matrix once more before using it. Measured
//! here (2-core Xeon): 1x576 @ 576x49152 took 150 ms through Burn (430 ms with the transposed
//! view), 50 ms in raw `sgemm`, 6-8 ms in numpy. A plain dot-product GEMV streams each weight once.
//!
//! Numerics: each output is `dot(x_row, w_row)` with 16 lane accumulators reduced in a fixed
//! order, no FMA contraction, so a token's result does not depend on how many rows share the
//! call or on the thread split (batching never changes results).

use burn_tensor::backend::Backend;
use burn_tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::linear::Linear;
use crate::nf4::Nf4Weight;

const LANES: usize = 16;

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y;
    }
    // Pairwise reduction in a fixed order.
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

/// Four dot products against one weight row: each weight load feeds four token rows. Every
/// result has exactly [`dot_body`]'s lane structure, so it is bit-identical to a lone `dot`.
#[inline(always)]
fn dot4_body(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let n = w.len();
    let mut acc = [[0f32; LANES]; 4];
    let full = n / LANES * LANES;
    let mut i = 0;
    while i < full {
        let wc = &w[i..i + LANES];
        for r in 0..4 {
            let xc = &x[r][i..i + LANES];
            for l in 0..LANES {
                acc[r][l] += xc[l] * wc[l];
            }
        }
        i += LANES;
    }
    for r in 0..4 {
        for (l, j) in (full..n).enumerate() {
            acc[r][l] += x[r][j] * w[j];
        }
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        let a = &mut acc[r];
        let mut width = LANES;
        while width > 1 {
            width /= 2;
            for l in 0..width {
                a[l] += a[l + width];
            }
        }
        out[r] = a[0];
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot4_avx2(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    dot4_body(x, w)
}

fn dot4(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was just detected.
            return unsafe { dot4_avx2(x, w) };
        }
    }
    dot4_body(x, w)
}

/// `sum_i a[i] * b[i]`, vectorized with AVX2 where the CPU has it (same result either way: the
/// lane structure is explicit and nothing is fused).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was just detected.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_body(a, b)
}

/// `y[t, n] = sum_k x[t, k] * w[n, k] (+ bias[n])`. `x`: `[tokens, k]`, `w`: `[n, k]`.
pub fn matmul_xwt(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    tokens: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    matmul_rows(x, bias, tokens, k, n, &F32Rows { w, k })
}

/// Supplies weight rows `[rows.len(), k]` to [`matmul_rows`]: borrowed from a float matrix, or
/// decoded into `scratch`.
pub trait RowSource: Sync {
    fn rows<'a>(&'a self, rows: std::ops::Range<usize>, scratch: &'a mut Vec<f32>) -> &'a [f32];
}

struct F32Rows<'w> {
    w: &'w [f32],
    k: usize,
}

impl RowSource for F32Rows<'_> {
    fn rows<'a>(&'a self, rows: std::ops::Range<usize>, _scratch: &'a mut Vec<f32>) -> &'a [f32] {
        &self.w[rows.start * self.k..rows.end * self.k]
    }
}

struct Nf4Rows<'w> {
    weight: &'w Nf4Weight,
    absmax: &'w [f32],
}

impl RowSource for Nf4Rows<'_> {
    fn rows<'a>(&'a self, rows: std::ops::Range<usize>, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.resize(rows.len() * self.weight.in_features, 0.0);
        self.weight.dequantize_rows(self.absmax, rows, scratch);
        scratch
    }
}

/// Output features per work item: each weight row is read once per call and stays in cache
/// while every token row uses it.
const BLOCK: usize = 64;

/// [`matmul_xwt`] with the weight rows supplied by `rows(range, scratch)`: a slice of a float
/// matrix, or rows dequantized into `scratch` (NF4). Results do not depend on the supplier.
pub fn matmul_rows(
    x: &[f32],
    bias: Option<&[f32]>,
    tokens: usize,
    k: usize,
    n: usize,
    source: &dyn RowSource,
) -> Vec<f32> {
    // y^T block-wise, then transpose.
    let mut yt = vec![0f32; n * tokens];
    yt.par_chunks_mut(BLOCK * tokens)
        .enumerate()
        .for_each(|(bi, out)| {
            let n0 = bi * BLOCK;
            let nrows = out.len() / tokens;
            let mut scratch = Vec::new();
            let w = source.rows(n0..n0 + nrows, &mut scratch);
            for (j, row_out) in out.chunks_mut(tokens).enumerate() {
                let wr = &w[j * k..(j + 1) * k];
                let b = bias.map_or(0.0, |b| b[n0 + j]);
                let row = |t: usize| &x[t * k..(t + 1) * k];
                let mut t = 0;
                while t + 4 <= tokens {
                    let r = dot4([row(t), row(t + 1), row(t + 2), row(t + 3)], wr);
                    for q in 0..4 {
                        row_out[t + q] = r[q] + b;
                    }
                    t += 4;
                }
                for (tt, o) in row_out.iter_mut().enumerate().skip(t) {
                    *o = dot(row(tt), wr) + b;
                }
            }
        });
    if tokens == 1 {
        return yt;
    }
    let mut y = vec![0f32; tokens * n];
    for j in 0..n {
        for t in 0..tokens {
            y[t * n + j] = yt[j * tokens + t];
        }
    }
    y
}

/// How a host linear holds its weight.
pub enum HostWeight {
    /// `[out, in]` row-major floats.
    F32(Vec<f32>),
    /// NF4 codes, dequantized row block by row block inside the product (the same numbers as
    /// dequantize-then-matmul, at 0.5 byte per weight read). `absmax` is the f32 per-block absmax.
    Nf4 { weight: Nf4Weight, absmax: Vec<f32> },
}

/// A linear layer computed on the host (the CPU backend).
pub struct HostLinear<B: Backend> {
    weight: HostWeight,
    bias: Option<Vec<f32>>,
    in_features: usize,
    out_features: usize,
    device: B::Device,
}

impl<B: Backend> HostLinear<B> {
    /// From a checkpoint-layout weight `[out, in]`.
    pub fn new(
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
        out_features: usize,
        in_features: usize,
        device: B::Device,
    ) -> Self {
        assert_eq!(weight.len(), out_features * in_features);
        HostLinear {
            weight: HostWeight::F32(weight),
            bias,
            in_features,
            out_features,
            device,
        }
    }
}

impl<B: Backend> HostLinear<B> {
    /// An NF4 weight (+ float bias, as bnb's Linear4bit keeps it).
    pub fn nf4(weight: Nf4Weight, bias: Option<Vec<f32>>, device: B::Device) -> Self {
        let (out_features, in_features) = (weight.out_features, weight.in_features);
        let absmax = weight.absmax_f32();
        HostLinear {
            weight: HostWeight::Nf4 { weight, absmax },
            bias,
            in_features,
            out_features,
            device,
        }
    }
}

impl<B: Backend> Linear<B> for HostLinear<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [tokens, k] = x.dims();
        assert_eq!(k, self.in_features, "linear input width");
        let xs: Vec<f32> = x
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 activations");
        let bias = self.bias.as_deref();
        let n = self.out_features;
        let y = match &self.weight {
            HostWeight::F32(w) => matmul_xwt(&xs, w, bias, tokens, k, n),
            HostWeight::Nf4 { weight, absmax } => {
                matmul_rows(&xs, bias, tokens, k, n, &Nf4Rows { weight, absmax })
            }
        };
        Tensor::from_data(TensorData::new(y, [tokens, n]), &self.device)
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn num_params(&self) -> usize {
        // PyTorch counts a Params4bit by its packed storage: out*in/2 elements.
        let w = match &self.weight {
            HostWeight::F32(w) => w.len(),
            HostWeight::Nf4 { weight, .. } => weight.packed.len(),
        };
        w + self.bias.as_ref().map_or(0, Vec::len)
    }
    fn nf4_bytes(&self) -> Option<usize> {
        match &self.weight {
            HostWeight::Nf4 { weight, .. } => Some(weight.stored_bytes()),
            HostWeight::F32(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_and_is_batch_invariant() {
        let (t, k, n) = (5, 37, 130);
        let x: Vec<f32> = (0..t * k)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
            .collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
        let y = matmul_xwt(&x, &w, Some(&bias), t, k, n);
        for ti in 0..t {
            for j in 0..n {
                let naive: f64 = (0..k)
                    .map(|i| x[ti * k + i] as f64 * w[j * k + i] as f64)
                    .sum::<f64>()
                    + bias[j] as f64;
                assert!((y[ti * n + j] as f64 - naive).abs() < 1e-4);
            }
            // Row ti alone gives bit-identical results.
            let alone = matmul_xwt(&x[ti * k..(ti + 1) * k], &w, Some(&bias), 1, k, n);
            assert_eq!(&y[ti * n..(ti + 1) * n], &alone[..]);
        }
    }
}
