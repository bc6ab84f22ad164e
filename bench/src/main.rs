//! `llm-bench`: checks and measurements that need the GPU. Run by `bench/gpu.sh` on the device
//! machine; prints one JSON object per figure (collected into docs/benchmarks.jsonl).
//!
//! - `kernel`: the NF4 CubeCL GEMV against the CPU reference (the host NF4 path, f32) on random
//!   inputs of Llama-3.1-8B shapes at batch 1/4/16, outputs poisoned with NaN first; the
//!   prefill path (dequantize + matmul) at 64 rows; the GEMV's weight-read bandwidth against the
//!   card's measured copy bandwidth.
//!   Also the fused RMSNorm / rotary / gated-activation kernels against the CPU's Burn ops.
//! - `tiny`: each tiny fixture model on CUDA (bf16) against HF's logits (tests/fixtures/tiny).
//! - `compare ARCH DIR`: a checkpoint on CUDA against the CPU (prompt, decode, 16-sequence batch).
//! - `prefill`: the NF4 prefill path (dequantize + matmul) at 128 and 512 rows on each
//!   projection shape of a Llama-3.1-8B layer, with the weight dequantized in either layout.

use std::time::Instant;

use burn_tensor::{Tensor, TensorData, TensorPrimitive};
use llm_core::attention::LayerKv;
use llm_core::cuda::{CudaBf16, CudaNf4Linear};
use llm_core::host_linear::HostLinear;
use llm_core::nf4::{Nf4Weight, WeightDtype};
use llm_core::rope::RopeTables;
use llm_core::testing::{fixtures, load_batched, load_on, rel_l2, to_vec, TinyReference};
use llm_core::weights::Quantization;
use llm_core::{Architecture, CausalLm, Cpu, KvCache, Linear, RmsNorm};

type Device = <CudaBf16 as burn_tensor::backend::BackendTypes>::Device;

fn emit(metric: &str, model: &str, value: f64, unit: &str, extra: serde_json::Value) {
    let mut o = serde_json::json!({"metric": metric, "model": model, "value": value, "unit": unit});
    if let (Some(d), Some(e)) = (o.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            d.insert(k.clone(), v.clone());
        }
    }
    println!("{o}");
}

/// Deterministic pseudo-normal values (sum of uniforms), scaled.
fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            }
            acc * scale
        })
        .collect()
}

fn bf16_round(v: &mut [f32]) {
    for x in v {
        *x = half::bf16::from_f32(*x).to_f32();
    }
}

/// [`randn`] rounded to bf16: inputs a bf16 kernel and an f32/f64 reference see exactly alike.
fn randn_bf16(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut v = randn(n, seed, scale);
    bf16_round(&mut v);
    v
}

/// An attention test case's config: `heads` query heads over `kv_heads`, head dim `d`, HF's
/// default scale `d^-0.5`.
fn attention_cfg(
    heads: usize,
    kv_heads: usize,
    d: usize,
    softcap: Option<f64>,
    window: Option<usize>,
) -> llm_core::attention::AttentionConfig {
    llm_core::attention::AttentionConfig {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: d,
        scale: (d as f64).powf(-0.5),
        softcap,
        sliding_window: window,
    }
}

/// HF's eager attention of one query row `q` (`d` values) over positions `keys` of the keys
/// and values `k`, `v` (`[t, d]`, one kv head), in f64: scaled scores, softcap, softmax,
/// weighted sum of the values.
fn attend_f64(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: std::ops::RangeInclusive<usize>,
    cfg: &llm_core::attention::AttentionConfig,
) -> Vec<f32> {
    let d = q.len();
    let scores: Vec<f64> = keys
        .clone()
        .map(|j| {
            let dot: f64 = (0..d).map(|i| q[i] as f64 * k[j * d + i] as f64).sum();
            let s = dot * cfg.scale;
            cfg.softcap.map_or(s, |c| c * (s / c).tanh())
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    (0..d)
        .map(|i| {
            let o: f64 = keys
                .clone()
                .zip(&e)
                .map(|(j, p)| p * v[j * d + i] as f64)
                .sum();
            (o / sum) as f32
        })
        .collect()
}

fn sync(device: &Device) {
    use burn_tensor::backend::Backend;
    CudaBf16::sync(device).expect("sync");
}

/// Device time per call of `f`, from CubeCL's profiler (CUDA events), over `iters` calls.
fn device_us(device: &Device, iters: usize, f: impl Fn() + Send + Sync) -> f64 {
    use burn_cubecl::cubecl::prelude::Runtime;
    let client = burn_cubecl::cubecl::cuda::CudaRuntime::client(device);
    f();
    sync(device);
    let (_, dur) = client
        .profile(
            || {
                for _ in 0..iters {
                    f();
                }
            },
            "bench",
        )
        .expect("profile");
    let d = burn_cubecl::cubecl::future::block_on(dur.resolve()).duration();
    d.as_secs_f64() / iters as f64 * 1e6
}

/// Wall time per call, back to back (includes host launch overhead).
fn wall_us(device: &Device, iters: usize, f: impl Fn()) -> f64 {
    f();
    sync(device);
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    sync(device);
    t0.elapsed().as_secs_f64() / iters as f64 * 1e6
}

/// `sweep`: with the launch-configuration sweep of the GEMV at batch 1 and 16.
/// The card's copy bandwidth: y = x * 1 over 1 GiB of bf16 (reads and writes 1 GiB each).
fn copy_bandwidth(device: &Device) -> f64 {
    let elems = 512 << 20;
    let x = Tensor::<CudaBf16, 1>::ones([elems], device);
    let us = device_us(device, 10, || {
        let _ = x.clone().mul_scalar(1.0);
    });
    let copy_gbs = (2.0 * 2.0 * elems as f64) / (us * 1e-6) / 1e9;
    emit(
        "copy_bandwidth",
        "-",
        copy_gbs,
        "GB/s",
        serde_json::json!({"timing": "device"}),
    );
    copy_gbs
}

fn kernel(device: &Device, sweep: bool) {
    use std::sync::atomic::Ordering::Relaxed;
    let copy_gbs = copy_bandwidth(device);
    // cuBLAS is the server's default where it loads (llm_core::driver); here one of the paths.
    llm_core::driver::USE_CUBLAS.store(true, Relaxed);

    for (k, n) in [(4096usize, 4096usize), (4096, 14336), (14336, 4096)] {
        let shape = format!("{n}x{k}");
        let w = randn(n * k, (n * 31 + k) as u64, 0.04);
        let q = Nf4Weight::quantize(&w, n, k, true, WeightDtype::BF16);
        let weight_bytes = (q.packed.len() + 4 * n * k / 64) as f64;
        let cpu = HostLinear::<Cpu>::nf4(q.clone(), None, Default::default());
        let gpu = CudaNf4Linear::new(q, None, device);
        let wd = gpu.dequantize();
        for b in [1usize, 2, 4, 8, 16, 32, 64] {
            let xs = randn_bf16(b * k, (b * 7 + n) as u64, 1.0);
            let want = to_vec(cpu.forward(Tensor::from_data(
                TensorData::new(xs.clone(), [b, k]),
                &Default::default(),
            )));
            let xg = Tensor::<CudaBf16, 2>::from_data(TensorData::new(xs, [b, k]), device);
            let mut paths = vec!["dequant_matmul"];
            // Past 16 rows `gemv` is the tensor-core kernel's token tiles.
            if b <= llm_core::cuda::GEMV_MAX_TOKENS
                || llm_core::cuda::GemvConfig::for_shape(b, n, k).kernel
                    == llm_core::cuda::GemvKernel::Mma
            {
                paths.insert(0, "gemv");
            }
            // Past one row `gemv` is the tensor-core kernel (k a multiple of 128); the SIMT
            // GEMV it replaced is the peer.
            if b > 1 && b <= llm_core::cuda::GEMV_MAX_TOKENS {
                paths.insert(1, "gemv_simt");
            }
            // What `Linear::forward` does past the GEMV's rows: dequantize, cuBLAS (when loaded).
            if b >= 8 && llm_core::driver::available() {
                paths.push("cublas");
            }
            for path in paths {
                let mma = llm_core::cuda::MMA_DECODE.load(Relaxed);
                llm_core::cuda::MMA_DECODE.store(mma && path != "gemv_simt", Relaxed);
                let path_mma = llm_core::cuda::GemvConfig::for_shape(b, n, k).kernel
                    == llm_core::cuda::GemvKernel::Mma;
                let got = if path == "gemv" || path == "gemv_simt" {
                    // Poison the output buffer: a kernel that skips an element shows as NaN.
                    let out = Tensor::<CudaBf16, 2>::full([b, n], f32::NAN, device)
                        .into_primitive()
                        .tensor();
                    let y = gpu.gemv_into(xg.clone().into_primitive().tensor(), out);
                    to_vec(Tensor::<CudaBf16, 2>::from_primitive(
                        TensorPrimitive::Float(y),
                    ))
                } else if path == "cublas" {
                    let Some(y) = gpu.forward_cublas(xg.clone()) else {
                        // The driver said why on stderr, and turned cuBLAS off.
                        emit(
                            "nf4_linear",
                            &shape,
                            f64::NAN,
                            "us",
                            serde_json::json!({"batch": b, "path": path, "pass": false,
                                               "error": "cuBLAS call failed (stderr)"}),
                        );
                        llm_core::cuda::MMA_DECODE.store(mma, Relaxed);
                        continue;
                    };
                    to_vec(y)
                } else {
                    to_vec(gpu.forward_dequant(xg.clone()))
                };
                let err = rel_l2(&got, &want);
                let run = || {
                    let _ = match path {
                        "gemv" | "gemv_simt" => gpu.forward_gemv(xg.clone()),
                        "cublas" => gpu.forward_cublas(xg.clone()).expect("cuBLAS"),
                        _ => gpu.forward_dequant(xg.clone()),
                    };
                };
                let dev = device_us(device, 50, run);
                let wall = wall_us(device, 50, run);
                llm_core::cuda::MMA_DECODE.store(mma, Relaxed);
                emit(
                    "nf4_linear",
                    &shape,
                    dev,
                    "us",
                    serde_json::json!({"batch": b, "path": path, "tensor_cores": path_mma,
                                       "rel_err": err, "pass": err < 1e-2,
                                       "wall_us": wall, "weight_GBps": weight_bytes / (dev * 1e-6) / 1e9,
                                       "fraction_of_copy": weight_bytes / (dev * 1e-6) / 1e9 / copy_gbs}),
                );
            }
            // Launch-configuration sweeps: the GEMV's (the `sweep` mode), the MMA kernel's.
            let mut sweeps = Vec::new();
            if sweep && (b == 1 || (b == 16 && k == 4096 && n == 14336)) {
                sweeps.push(("nf4_gemv_sweep", gemv_configs(b)));
            }
            if matches!(b, 4 | 16 | 32 | 64)
                && llm_core::cuda::GemvConfig::for_shape(b, n, k).kernel
                    == llm_core::cuda::GemvKernel::Mma
            {
                sweeps.push(("nf4_mma_sweep", mma_configs(b)));
            }
            for (metric, configs) in sweeps {
                let (w, c) = (weight_bytes, copy_gbs);
                sweep_configs(device, &gpu, &xg, &want, &shape, b, w, c, metric, &configs);
            }
            // The peer in the same run: Burn's dense bf16 matmul with the [N,K] weight transposed.
            let dev = device_us(device, 50, || {
                let _ = xg.clone().matmul(wd.clone().transpose());
            });
            emit(
                "bf16_matmul",
                &shape,
                dev,
                "us",
                serde_json::json!({"batch": b,
                 "weight_GBps": (2 * n * k) as f64 / (dev * 1e-6) / 1e9}),
            );
        }
    }
    llm_core::driver::USE_CUBLAS.store(false, Relaxed);
}

/// The batch-1 GEMV, 20 launches per shape and launch configuration and nothing else on the
/// GPU, for Nsight Compute to time each launch (`bench/gpu.sh gemv`): the kernel's own
/// duration, which the back-to-back timings of `kernel` cannot separate from the host's launch
/// rate when the kernel is short, and with the weights not left in L2 by the launch before
/// (Nsight Compute flushes the caches between launches; the 14336-wide weights, 33 MB, fit the
/// H200's 50 MB L2, so back-to-back timings flatter them). The configurations: the default,
/// then each of `GEMV_CONFIGS` (`ROWSxPLANESxUNROLL,...`; `t` first for the tensor-core kernel,
/// whose UNROLL is its windows ahead, 1 or 3), each first checked once against the CPU
/// reference on a poisoned output (that launch is the group's first of 21).
fn gemv_for_ncu(device: &Device) {
    copy_bandwidth(device);
    let extra: Vec<llm_core::cuda::GemvConfig> = std::env::var("GEMV_CONFIGS")
        .unwrap_or_default()
        .split(',')
        .filter(|c| !c.is_empty())
        .map(|c| {
            // `t` first: the hand-written tensor-core kernel (ROWS 16 or 32).
            let (kernel, c) = match c.strip_prefix('t') {
                Some(rest) => (llm_core::cuda::GemvKernel::Tc, rest),
                None => (llm_core::cuda::GemvKernel::Simt, c),
            };
            let v: Vec<usize> = c
                .split('x')
                .map(|n| n.parse().expect("GEMV_CONFIGS"))
                .collect();
            assert!(v.len() == 3, "GEMV_CONFIGS: [t]ROWSxPLANESxUNROLL");
            llm_core::cuda::GemvConfig {
                rows: v[0],
                planes: v[1],
                unroll: v[2],
                kernel,
            }
        })
        .collect();
    for (k, n) in [(4096usize, 4096usize), (4096, 14336), (14336, 4096)] {
        let w = randn(n * k, (n * 31 + k) as u64, 0.04);
        let q = Nf4Weight::quantize(&w, n, k, true, WeightDtype::BF16);
        let cpu = (!extra.is_empty())
            .then(|| HostLinear::<Cpu>::nf4(q.clone(), None, Default::default()));
        let gpu = CudaNf4Linear::new(q, None, device);
        let xs = randn_bf16(k, 7 + n as u64, 1.0);
        let want = cpu.map(|cpu| {
            to_vec(cpu.forward(Tensor::from_data(
                TensorData::new(xs.clone(), [1, k]),
                &Default::default(),
            )))
        });
        let xg = Tensor::<CudaBf16, 2>::from_data(TensorData::new(xs, [1, k]), device);
        let default = llm_core::cuda::GemvConfig::for_shape(1, n, k);
        for (i, cfg) in std::iter::once(default)
            .chain(extra.iter().copied())
            .enumerate()
        {
            let (err, skip) = match &want {
                Some(want) => (check_gemv(device, &gpu, &xg, want, cfg).0, 1),
                None => (f64::NAN, 0),
            };
            let out = Tensor::<CudaBf16, 2>::empty([1, n], device)
                .into_primitive()
                .tensor();
            for _ in 0..20 {
                let _ = gpu.gemv_into_with(xg.clone().into_primitive().tensor(), out.clone(), cfg);
            }
            sync(device);
            emit(
                "gemv_for_ncu",
                &format!("{n}x{k}"),
                20.0,
                "launches",
                serde_json::json!({"weight_bytes": n * k / 2 + 4 * n * k / 64,
                                   "rows": cfg.rows, "planes": cfg.planes, "unroll": cfg.unroll,
                                   "kernel": format!("{:?}", cfg.kernel),
                                   "default": i == 0, "skip": skip,
                                   "rel_err": err, "pass": want.is_none() || err < 1e-2}),
            );
        }
    }
}

/// Every launch configuration of `configs` on `xg` (`batch` rows): each checked against the
/// CPU reference on a poisoned output, then timed, one `metric` object per configuration.
#[allow(clippy::too_many_arguments)]
fn sweep_configs(
    device: &Device,
    gpu: &CudaNf4Linear,
    xg: &Tensor<CudaBf16, 2>,
    want: &[f32],
    shape: &str,
    batch: usize,
    weight_bytes: f64,
    copy_gbs: f64,
    metric: &str,
    configs: &[llm_core::cuda::GemvConfig],
) {
    for &cfg in configs {
        let (err, dev) = check_and_time(device, gpu, xg, want, cfg);
        emit(
            metric,
            shape,
            dev,
            "us",
            serde_json::json!({"batch": batch, "rows": cfg.rows, "planes": cfg.planes,
                               "kernel": format!("{:?}", cfg.kernel),
                               "unroll": cfg.unroll,
                               "default": cfg == llm_core::cuda::GemvConfig::for_shape(batch, gpu.out_features(), gpu.in_features()),
                               "rel_err": err, "pass": err < 1e-2,
                               "weight_GBps": weight_bytes / (dev * 1e-6) / 1e9,
                               "fraction_of_copy": weight_bytes / (dev * 1e-6) / 1e9 / copy_gbs}),
        );
    }
}

/// The GEMV's launch configurations (rows per cube, steps loaded ahead, planes): each its own
/// compiled kernel, 48 at batch 1, 12 at more rows.
fn gemv_configs(batch: usize) -> Vec<llm_core::cuda::GemvConfig> {
    let (rows, unrolls, planes_list): (&[usize], &[usize], &[usize]) = if batch == 1 {
        (&[2, 4, 8], &[1, 2, 4], &[1, 2, 4, 8])
    } else {
        (&[1, 2], &[1, 2], &[2, 4, 8])
    };
    configs(rows, unrolls, planes_list, llm_core::cuda::GemvKernel::Simt)
}

/// The tensor-core kernel's launch configurations at `batch` token rows: rows per cube (its
/// groups of 8 sharing each `x` fragment; at most 4 groups x tiles of 16 tokens), windows in
/// flight, planes.
fn mma_configs(batch: usize) -> Vec<llm_core::cuda::GemvConfig> {
    let tiles = batch.div_ceil(16);
    let rows: Vec<usize> = [8, 16, 32]
        .into_iter()
        .filter(|r| r / 8 * tiles <= 4)
        .collect();
    configs(&rows, &[1, 2], &[4, 8], llm_core::cuda::GemvKernel::Mma)
}

/// Every (rows, unroll, planes) combination.
fn configs(
    rows: &[usize],
    unrolls: &[usize],
    planes_list: &[usize],
    kernel: llm_core::cuda::GemvKernel,
) -> Vec<llm_core::cuda::GemvConfig> {
    let mut out = Vec::new();
    for &rows in rows {
        for &unroll in unrolls {
            for &planes in planes_list {
                out.push(llm_core::cuda::GemvConfig {
                    rows,
                    planes,
                    unroll,
                    kernel,
                });
            }
        }
    }
    out
}

/// The fused kernel launched as `cfg` on `xg`: its relative error against `want` (output
/// poisoned with NaN first, so a skipped element shows) and its device µs over 50 launches.
fn check_and_time(
    device: &Device,
    gpu: &CudaNf4Linear,
    xg: &Tensor<CudaBf16, 2>,
    want: &[f32],
    cfg: llm_core::cuda::GemvConfig,
) -> (f64, f64) {
    let (err, out) = check_gemv(device, gpu, xg, want, cfg);
    let dev = device_us(device, 50, || {
        let _ = gpu.gemv_into_with(xg.clone().into_primitive().tensor(), out.clone(), cfg);
    });
    (err, dev)
}

/// One launch of the fused kernel as `cfg` on `xg` into an output poisoned with NaN (a
/// skipped element shows): its relative error against `want`, and the output buffer.
fn check_gemv(
    device: &Device,
    gpu: &CudaNf4Linear,
    xg: &Tensor<CudaBf16, 2>,
    want: &[f32],
    cfg: llm_core::cuda::GemvConfig,
) -> (
    f64,
    burn_cubecl::tensor::CubeTensor<burn_cubecl::cubecl::cuda::CudaRuntime>,
) {
    let shape = [xg.dims()[0], gpu.out_features()];
    let out = Tensor::<CudaBf16, 2>::full(shape, f32::NAN, device)
        .into_primitive()
        .tensor();
    let got = to_vec(Tensor::<CudaBf16, 2>::from_primitive(
        TensorPrimitive::Float(gpu.gemv_into_with(
            xg.clone().into_primitive().tensor(),
            out.clone(),
            cfg,
        )),
    ));
    (rel_l2(&got, want), out)
}

/// The fused per-layer kernels (RMSNorm, rotary embedding, gated SiLU / GELU-tanh) against
/// the CPU's Burn-op path (f32) on the same bf16-rounded random inputs of Llama-3.1-8B shapes
/// at 16 rows, and their wall time per call against the same steps as Burn ops on the GPU.
fn fused(device: &Device) {
    use llm_core::backend::LlmBackend;
    use llm_core::config::Activation;
    let cpu: <Cpu as burn_tensor::backend::BackendTypes>::Device = Default::default();
    let rows = 16;
    let pair = |v: &[f32], shape: [usize; 2]| {
        (
            Tensor::<Cpu, 2>::from_data(TensorData::new(v.to_vec(), shape), &cpu),
            Tensor::<CudaBf16, 2>::from_data(TensorData::new(v.to_vec(), shape), device),
        )
    };
    let report = |name: &str, got: Vec<f32>, want: Vec<f32>, fused_us: f64, ops_us: f64| {
        let err = rel_l2(&got, &want);
        emit(
            name,
            "-",
            fused_us,
            "us",
            serde_json::json!({"rows": rows, "rel_err": err, "pass": err < 1e-2,
                               "burn_ops_wall_us": ops_us, "timing": "wall"}),
        );
    };

    let hidden = 4096;
    let (xc, xg) = pair(&randn_bf16(rows * hidden, 1, 1.0), [rows, hidden]);
    let w = randn_bf16(hidden, 2, 0.3);
    let norm = |unit_offset| {
        let data = || TensorData::new(w.clone(), [hidden]);
        let (eps, weight) = (1e-5, Tensor::from_data(data(), &cpu));
        let nc = RmsNorm::<Cpu> {
            weight,
            eps,
            unit_offset,
        };
        let weight = Tensor::from_data(data(), device);
        let ng = RmsNorm::<CudaBf16> {
            weight,
            eps,
            unit_offset,
        };
        (nc, ng)
    };
    // Llama's norm, and Gemma-2's `(1 + w)` variant (rounded once).
    for (name, unit_offset) in [
        ("fused_rms_norm", false),
        ("fused_rms_norm_unit_offset", true),
    ] {
        let (nc, ng) = norm(unit_offset);
        let want = to_vec(Cpu::rms_norm(xc.clone(), &nc));
        let got = to_vec(CudaBf16::rms_norm(xg.clone(), &ng));
        let f = wall_us(device, 200, || {
            let _ = CudaBf16::rms_norm(xg.clone(), &ng);
        });
        let o = wall_us(device, 200, || {
            let _ = llm_core::norm::rms_norm_ops(xg.clone(), &ng.weight, ng.eps, unit_offset);
        });
        report(name, got, want, f, o);
    }

    // Residual add + RMSNorm: both outputs (the sum and its norm) compared.
    let (nc, ng) = norm(false);
    let (rc, rg) = pair(&randn_bf16(rows * hidden, 8, 1.0), [rows, hidden]);
    let (sum_c, norm_c) = Cpu::add_rms_norm(xc, rc, &nc);
    let (sum_g, norm_g) = CudaBf16::add_rms_norm(xg.clone(), rg.clone(), &ng);
    let (mut got, mut want) = (to_vec(sum_g), to_vec(sum_c));
    got.extend(to_vec(norm_g));
    want.extend(to_vec(norm_c));
    let f = wall_us(device, 200, || {
        let _ = CudaBf16::add_rms_norm(xg.clone(), rg.clone(), &ng);
    });
    let o = wall_us(device, 200, || {
        let sum = xg.clone() + rg.clone();
        let _ = llm_core::norm::rms_norm_ops(sum, &ng.weight, ng.eps, false);
    });
    report("fused_add_rms_norm", got, want, f, o);

    let (heads, d) = (32, 128);
    let (xc, xg) = pair(&randn_bf16(rows * heads * d, 3, 1.0), [rows, heads * d]);
    let (cc, cg) = pair(&randn_bf16(rows * d, 4, 0.5), [rows, d]);
    let (sc, sg) = pair(&randn_bf16(rows * d, 5, 0.5), [rows, d]);
    let tc = RopeTables { cos: cc, sin: sc };
    let tg = RopeTables { cos: cg, sin: sg };
    let want = to_vec(Cpu::rope(xc, heads, &tc));
    let got = to_vec(CudaBf16::rope(xg.clone(), heads, &tg));
    let f = wall_us(device, 200, || {
        let _ = CudaBf16::rope(xg.clone(), heads, &tg);
    });
    let o = wall_us(device, 200, || {
        let _ = tg.apply(xg.clone().reshape([rows, heads, d]).swap_dims(0, 1));
    });
    report("fused_rope", got, want, f, o);

    let inter = 14336;
    let (gc, gg) = pair(&randn_bf16(rows * inter, 6, 2.0), [rows, inter]);
    let (uc, ug) = pair(&randn_bf16(rows * inter, 7, 1.0), [rows, inter]);
    for (name, act) in [
        ("fused_silu_mul", Activation::Silu),
        ("fused_gelu_tanh_mul", Activation::GeluTanh),
    ] {
        let want = to_vec(Cpu::gated_act(gc.clone(), uc.clone(), act));
        let got = to_vec(CudaBf16::gated_act(gg.clone(), ug.clone(), act));
        let f = wall_us(device, 200, || {
            let _ = CudaBf16::gated_act(gg.clone(), ug.clone(), act);
        });
        let o = wall_us(device, 200, || {
            let _ = llm_core::mlp::gated_act_ops(gg.clone(), ug.clone(), act);
        });
        report(name, got, want, f, o);
    }
}

/// The decode attention kernel against a direct f32 computation (scores, softcap, sliding
/// window, softmax, weighted sum) on the same bf16-rounded inputs: Llama-3.1-8B (GQA 32/8,
/// d 128), Gemma-2 (d 256, softcap 50, window 128) and Phi-3 (d 96, no GQA) shapes; wall time
/// per call against Burn's attention with repeated K/V (what the model runs without it).
fn fused_attention(device: &Device) {
    use llm_core::backend::LlmBackend;
    let cases = [
        ("llama", 32, 8, 128, 300, None, None),
        ("gemma2", 8, 4, 256, 300, Some(50.0), Some(128)),
        ("phi3", 32, 32, 96, 37, None, None),
    ];
    for (name, heads, kv_heads, d, t, softcap, window) in cases {
        let cfg = attention_cfg(heads, kv_heads, d, softcap, window);
        let (q, k, v) = (
            randn_bf16(heads * d, 11, 1.0),
            randn_bf16(kv_heads * t * d, 12, 1.0),
            randn_bf16(kv_heads * t * d, 13, 1.0),
        );
        let groups = heads / kv_heads;
        let start = window.map_or(0, |w: usize| t.saturating_sub(w));
        let mut want = vec![0f32; heads * d];
        for h in 0..heads {
            let head = (h / groups * t * d)..((h / groups + 1) * t * d);
            let (k, v) = (&k[head.clone()], &v[head]);
            let row = attend_f64(&q[h * d..(h + 1) * d], k, v, start..=t - 1, &cfg);
            want[h * d..(h + 1) * d].copy_from_slice(&row);
        }
        let qg = Tensor::<CudaBf16, 3>::from_data(TensorData::new(q, [heads, 1, d]), device);
        let kg = Tensor::<CudaBf16, 3>::from_data(TensorData::new(k, [kv_heads, t, d]), device);
        let vg = Tensor::<CudaBf16, 3>::from_data(TensorData::new(v, [kv_heads, t, d]), device);
        // The cache as the model holds it: room past `t` (poisoned with NaN: a kernel that
        // reads past the filled positions, or strides by `t` instead of the capacity, shows).
        let cap = t + 29;
        let room = |x: &Tensor<CudaBf16, 3>| {
            Tensor::<CudaBf16, 3>::full([kv_heads, cap, d], f32::NAN, device)
                .slice_assign([0..kv_heads, 0..t, 0..d], x.clone())
        };
        let cache = LayerKv {
            k: room(&kg),
            v: room(&vg),
            len: t,
            pool: None,
        };
        let got = CudaBf16::decode_attention(&qg, &cache, &cfg).expect("a covered shape");
        let err = rel_l2(&to_vec(got), &want);
        let fused = wall_us(device, 200, || {
            let _ = CudaBf16::decode_attention(&qg, &cache, &cfg);
        });
        let repeat = |x: Tensor<CudaBf16, 3>| {
            x.unsqueeze_dim::<4>(1)
                .expand([kv_heads, groups, t, d])
                .reshape([1, heads, t, d])
        };
        let ops = wall_us(device, 200, || {
            let _ = burn_tensor::module::attention(
                qg.clone().unsqueeze_dim(0),
                repeat(kg.clone()),
                repeat(vg.clone()),
                None,
                None,
                burn_tensor::ops::AttentionModuleOptions {
                    scale: Some(cfg.scale),
                    softcap,
                    is_causal: false,
                },
            );
        });
        emit(
            "fused_decode_attention",
            name,
            fused,
            "us",
            serde_json::json!({"heads": heads, "kv_heads": kv_heads, "head_dim": d, "positions": t,
                               "softcap": softcap, "window": window, "rel_err": err,
                               "pass": err < 1e-2, "burn_ops_wall_us": ops, "timing": "wall"}),
        );
    }
}

/// A prompt chunk's attention through cuBLAS (`LlmBackend::chunk_attention`: scores GEMM,
/// masked softmax, values GEMM) against a direct f64 computation on the same bf16 inputs, and
/// against the row kernel (`decode_attention_rows`) it replaces on long chunks: a chunk of
/// `len` rows at positions `start..start + len` of slot 1 of a two-slot pool whose positions
/// past the chunk hold NaN (a product that reads them, or a mask that lets them through,
/// shows). Llama-3.1-8B (GQA 32/8, d 128), Gemma-2 (d 256, softcap 50, window 128, a chunk
/// past the window) and Phi-3 (d 96, no GQA) shapes; then wall time per call of both paths
/// on the 8B's 512-token prompt (one chunk of 512 rows from position 0).
fn chunk_attention(device: &Device) {
    use llm_core::attention::PoolLayer;
    use llm_core::backend::LlmBackend;
    use std::sync::atomic::Ordering::Relaxed;
    // The path runs on cuBLAS (the server's default where it loads); the cases below are
    // shorter than the server's threshold (`CHUNK_ATTENTION_ROWS`), so lower it here.
    llm_core::driver::USE_CUBLAS.store(true, Relaxed);
    let threshold = llm_core::cuda::CHUNK_ATTENTION_ROWS.swap(1, Relaxed);
    let cases = [
        ("llama", 32, 8, 128, 100, 160, None, None),
        ("gemma2", 8, 4, 256, 100, 160, Some(50.0), Some(128)),
        ("phi3", 32, 32, 96, 0, 128, None, None),
        ("llama", 32, 8, 128, 0, 512, None, None),
    ];
    for (name, heads, kv_heads, d, start, len, softcap, window) in cases {
        let cfg = attention_cfg(heads, kv_heads, d, softcap, window);
        let total = start + len;
        let (q, k, v) = (
            randn_bf16(heads * len * d, 21, 1.0),
            randn_bf16(kv_heads * total * d, 22, 1.0),
            randn_bf16(kv_heads * total * d, 23, 1.0),
        );
        let groups = heads / kv_heads;
        // Only the timed 512-row case skips the f64 reference (~1 G multiply-adds).
        let check = len < 512;
        let mut want = vec![0f32; len * heads * d];
        for h in (0..heads).filter(|_| check) {
            let head = (h / groups * total * d)..((h / groups + 1) * total * d);
            let (k, v) = (&k[head.clone()], &v[head]);
            for r in 0..len {
                let pos = start + r;
                let lo = window.map_or(0, |w: usize| (pos + 1).saturating_sub(w));
                let q = &q[(h * len + r) * d..(h * len + r + 1) * d];
                let at = r * heads * d + h * d;
                want[at..at + d].copy_from_slice(&attend_f64(q, k, v, lo..=pos, &cfg));
            }
        }
        // A pool of two slots with room past `total`, NaN wherever the chunk's slot is not
        // filled and in the other slot.
        let cap = total + 37;
        let pool_of = |x: Vec<f32>| {
            let xg =
                Tensor::<CudaBf16, 3>::from_data(TensorData::new(x, [kv_heads, total, d]), device);
            Tensor::<CudaBf16, 4>::full([2, kv_heads, cap, d], f32::NAN, device)
                .slice_assign([1..2, 0..kv_heads, 0..total, 0..d], xg.unsqueeze_dim(0))
        };
        let pool = PoolLayer {
            k: pool_of(k),
            v: pool_of(v),
        };
        let qg = Tensor::<CudaBf16, 3>::from_data(TensorData::new(q, [heads, len, d]), device);
        let meta: Vec<i32> = (0..len).flat_map(|r| [1, (start + r) as i32]).collect();
        let meta = Tensor::<CudaBf16, 1, burn_tensor::Int>::from_data(
            TensorData::new(meta, [2 * len]),
            device,
        );
        let Some(got) = CudaBf16::chunk_attention(&qg, &pool, 1, start, &cfg) else {
            emit(
                "chunk_attention",
                name,
                f64::NAN,
                "us",
                serde_json::json!({"pass": false, "why": "declined (no cuBLAS, or the shape)"}),
            );
            continue;
        };
        let rows = CudaBf16::decode_attention_rows(&qg, &pool, &meta, &cfg).expect("covered");
        let got = to_vec(got);
        let vs_rows = rel_l2(&got, &to_vec(rows));
        let err = if check { rel_l2(&got, &want) } else { f64::NAN };
        let gemm_us = wall_us(device, 50, || {
            let _ = CudaBf16::chunk_attention(&qg, &pool, 1, start, &cfg);
        });
        let rows_us = wall_us(device, 20, || {
            let _ = CudaBf16::decode_attention_rows(&qg, &pool, &meta, &cfg);
        });
        emit(
            "chunk_attention",
            name,
            gemm_us,
            "us",
            serde_json::json!({"heads": heads, "kv_heads": kv_heads, "head_dim": d,
                               "start": start, "rows": len, "softcap": softcap,
                               "window": window, "rel_err": err, "rel_err_vs_rows": vs_rows,
                               "pass": (!check || err < 1e-2) && vs_rows < 1e-2,
                               "rows_kernel_wall_us": rows_us, "timing": "wall"}),
        );
    }
    llm_core::cuda::CHUNK_ATTENTION_ROWS.store(threshold, Relaxed);
    llm_core::driver::USE_CUBLAS.store(false, Relaxed);
}

/// The in-place KV-cache append (k's rope in the same kernel) against the Burn-op path on the
/// CPU (rope, then concatenation), Llama-3.1-8B shapes (8 kv heads, d 128): a 200-row prefill
/// chunk, then 100 single-row decode appends (the cache grows past its first capacity on the
/// way), every filled position compared. Wall time of one decode append against the Burn-op
/// path on the GPU.
fn fused_kv_append(device: &Device) {
    const KV_ROOM: usize = 16;
    use llm_core::attention::kv_append_ops;
    use llm_core::backend::LlmBackend;
    let cpu: <Cpu as burn_tensor::backend::BackendTypes>::Device = Default::default();
    let (kv_heads, d, prefill, steps) = (8, 128, 200, 100);
    let total = prefill + steps;
    let (k, v) = (
        randn_bf16(total * kv_heads * d, 21, 1.0),
        randn_bf16(total * kv_heads * d, 22, 1.0),
    );
    let (cos, sin) = (
        randn_bf16(total * d, 23, 0.5),
        randn_bf16(total * d, 24, 0.5),
    );
    let data = KvRows {
        k: &k,
        v: &v,
        cos: &cos,
        sin: &sin,
        width: kv_heads * d,
        d,
    };
    let mut cpu_cache: Option<LayerKv<Cpu>> = None;
    let mut gpu_cache: Option<LayerKv<CudaBf16>> = None;
    let mut r0 = 0;
    for n in std::iter::once(prefill).chain(std::iter::repeat_n(1, steps)) {
        let (kc, vc, tc) = data.rows::<Cpu>(r0, n, &cpu);
        let (kg, vg, tg) = data.rows::<CudaBf16>(r0, n, device);
        cpu_cache = Some(kv_append_ops(cpu_cache.take(), kc, vc, kv_heads, &tc));
        gpu_cache = Some(CudaBf16::kv_append(gpu_cache.take(), kg, vg, kv_heads, &tg));
        r0 += n;
    }
    let (c, g) = (cpu_cache.expect("appended"), gpu_cache.expect("appended"));
    let err = rel_l2(&to_vec(g.keys()), &to_vec(c.keys()))
        .max(rel_l2(&to_vec(g.values()), &to_vec(c.values())));
    let step = |n: usize| data.rows::<CudaBf16>(0, n, device);
    let (k1, v1, t1) = step(1);
    // Each timed call appends one row at position `total` of a cache with room to spare:
    // in place for the kernel (its length is set back after each call, so it never grows),
    // a new concatenated tensor for the Burn ops.
    let capacity = g.capacity();
    let (kr, vr, tr) = step(KV_ROOM);
    let room = std::cell::RefCell::new(Some(CudaBf16::kv_append(Some(g), kr, vr, kv_heads, &tr)));
    let fused = wall_us(device, 200, || {
        let mut c = room.borrow_mut().take().expect("cache");
        c.len = total;
        *room.borrow_mut() = Some(CudaBf16::kv_append(
            Some(c),
            k1.clone(),
            v1.clone(),
            kv_heads,
            &t1,
        ));
    });
    let mut grown = room.borrow_mut().take().expect("cache");
    grown.len = total;
    let ops = wall_us(device, 200, || {
        let past = LayerKv {
            k: grown.keys(),
            v: grown.values(),
            len: total,
            pool: None,
        };
        let _ = kv_append_ops(Some(past), k1.clone(), v1.clone(), kv_heads, &t1);
    });
    emit(
        "fused_kv_append",
        "llama",
        fused,
        "us",
        serde_json::json!({"kv_heads": kv_heads, "head_dim": d, "positions": total,
                           "capacity_after_appends": capacity, "rel_err": err, "pass": err < 1e-2,
                           "burn_ops_wall_us": ops, "timing": "wall"}),
    );
}

/// Rows of a KV-append test's inputs: keys and values `[positions, width]`, rope tables
/// `[positions, d]`.
struct KvRows<'a> {
    k: &'a [f32],
    v: &'a [f32],
    cos: &'a [f32],
    sin: &'a [f32],
    width: usize,
    d: usize,
}

impl KvRows<'_> {
    /// Rows `r0..r0 + n` as tensors on `device`: keys, values, rope tables.
    fn rows<B: burn_tensor::backend::Backend>(
        &self,
        r0: usize,
        n: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>, RopeTables<B>) {
        let take = |x: &[f32], w: usize| {
            Tensor::<B, 2>::from_data(
                TensorData::new(x[r0 * w..(r0 + n) * w].to_vec(), [n, w]),
                device,
            )
        };
        (
            take(self.k, self.width),
            take(self.v, self.width),
            RopeTables {
                cos: take(self.cos, self.d),
                sin: take(self.sin, self.d),
            },
        )
    }
}

/// q/k/v in one GEMV launch and gate/up with the activation in one launch, against the CPU
/// reference (host NF4 linears, f32; Burn-op activation) on Llama-3.1-8B shapes at 1 token
/// row (the SIMT GEMV) and 4, 16, 32, 48 (the MMA kernel at one, two, three token tiles, each
/// with its own rows per cube); wall time per call against the separate launches they replace.
fn fused_projections(device: &Device) {
    use llm_core::backend::LlmBackend;
    use llm_core::config::Activation;
    let cpu: <Cpu as burn_tensor::backend::BackendTypes>::Device = Default::default();
    let (hidden, kv, inter) = (4096, 1024, 14336);
    let layer = |n: usize, k: usize, seed: u64| {
        let w = randn(n * k, seed, 0.04);
        let q = Nf4Weight::quantize(&w, n, k, true, WeightDtype::BF16);
        (
            HostLinear::<Cpu>::nf4(q.clone(), None, cpu),
            CudaNf4Linear::new(q, None, device),
        )
    };
    let (qc, qg) = layer(hidden, hidden, 31);
    let (kc, kg) = layer(kv, hidden, 32);
    let (vc, vg) = layer(kv, hidden, 33);
    let (gc, gg) = layer(inter, hidden, 34);
    let (uc, ug) = layer(inter, hidden, 35);
    for rows in [1usize, 4, 16, 32, 48] {
        let xs = randn_bf16(rows * hidden, 36 + rows as u64, 1.0);
        let xc = Tensor::<Cpu, 2>::from_data(TensorData::new(xs.clone(), [rows, hidden]), &cpu);
        let xg = Tensor::<CudaBf16, 2>::from_data(TensorData::new(xs, [rows, hidden]), device);

        let got = CudaBf16::linears_stacked(&xg, &[&qg, &kg, &vg]).expect("stacked q/k/v");
        let mut err = 0f64;
        for (g, c) in got.into_iter().zip([&qc, &kc, &vc]) {
            err = err.max(rel_l2(&to_vec(g), &to_vec(c.forward(xc.clone()))));
        }
        let fused = wall_us(device, 200, || {
            let _ = CudaBf16::linears_stacked(&xg, &[&qg, &kg, &vg]);
        });
        let apart = wall_us(device, 200, || {
            for l in [&qg, &kg, &vg] {
                let _ = l.forward(xg.clone());
            }
        });
        emit(
            "fused_qkv_gemv",
            "llama",
            fused,
            "us",
            serde_json::json!({"rows": rows, "rel_err": err, "pass": err < 1e-2,
                               "separate_wall_us": apart, "timing": "wall"}),
        );

        for (name, act) in [
            ("fused_gate_up_silu", Activation::Silu),
            ("fused_gate_up_gelu_tanh", Activation::GeluTanh),
        ] {
            let want = to_vec(llm_core::mlp::gated_act_ops(
                gc.forward(xc.clone()),
                uc.forward(xc.clone()),
                act,
            ));
            let got = CudaBf16::gated_linears(&xg, &gg, &ug, act).expect("gated gate/up");
            let err = rel_l2(&to_vec(got), &want);
            let fused = wall_us(device, 200, || {
                let _ = CudaBf16::gated_linears(&xg, &gg, &ug, act);
            });
            let apart = wall_us(device, 200, || {
                let _ = CudaBf16::gated_act(gg.forward(xg.clone()), ug.forward(xg.clone()), act);
            });
            emit(
                name,
                "llama",
                fused,
                "us",
                serde_json::json!({"rows": rows, "rel_err": err, "pass": err < 1e-2,
                                   "separate_wall_us": apart, "timing": "wall"}),
            );
        }
    }
}

fn tiny_one<A: Architecture>(arch: &str, device: &Device) {
    let r = TinyReference::open(arch);
    let input = r.ids("input_ids");
    for (dir, quant, key) in [
        ("bf16", Quantization::None, "logits_f32"),
        ("bf16", Quantization::Nf4, "logits_nf4_f32"),
        ("nf4", Quantization::Nf4, "logits_nf4_f32"),
    ] {
        let path = fixtures().join("tiny").join(arch).join(dir);
        let model = load_on::<A, CudaBf16>(&path, device.clone(), "cuda", quant);
        let mut cache = KvCache::new(model.num_layers());
        let logits = to_vec(model.forward(&input, &mut cache, true));
        let err = rel_l2(&logits, &r.floats(key).1);
        // Decode with the KV cache too (single-token steps go through the NF4 GEMV): the
        // first half of the prompt prefilled, the rest fed one token per step; the decoded
        // rows against the reference's rows (one row alone is too noisy a figure: HF's own bf16
        // rows range 0.02-0.09 against the f32 reference).
        let (shape, want) = r.floats(key);
        let (vocab, split) = (shape[1], input.len() / 2);
        let want_steps = &want[split * vocab..input.len() * vocab];
        let decode_steps = || {
            let mut cache = KvCache::new(model.num_layers());
            let _ = model.forward(&input[..split], &mut cache, false);
            let mut rows = Vec::new();
            for &tok in &input[split..] {
                rows.extend(to_vec(model.forward(&[tok], &mut cache, false)));
            }
            rows
        };
        let err_decode = rel_l2(&decode_steps(), want_steps);
        // The same steps with each NF4 projection launched on its own (no q/k/v stacking, no
        // activation in the gate/up GEMV), to tell the fusion's rounding from the rest.
        use std::sync::atomic::Ordering::Relaxed;
        llm_core::cuda::FUSED_PROJECTIONS.store(false, Relaxed);
        let err_separate = rel_l2(&decode_steps(), want_steps);
        llm_core::cuda::FUSED_PROJECTIONS.store(true, Relaxed);
        // The peer: HF transformers + bitsandbytes with bf16 compute (the seed's recipe, run on
        // a GPU when the fixtures were made) against the same reference rows.
        let peer = (key == "logits_nf4_f32" && r.has("logits_nf4_bnb_bf16")).then(|| {
            let hf = r.floats("logits_nf4_bnb_bf16").1;
            serde_json::json!({"all_rows": rel_l2(&hf, &want),
                               "decode_rows": rel_l2(&hf[split * vocab..], want_steps)})
        });
        emit(
            "tiny_cuda_rel_err",
            &format!("tiny-{arch}"),
            err,
            "rel_l2",
            serde_json::json!({"weights": dir, "quantization": quant.name(), "reference": key,
                               "decode_rows": input.len() - split,
                               "decode_steps_rel_err": err_decode,
                               "decode_steps_rel_err_separate_projections": err_separate,
                               "hf_bnb_bf16_rel_err": peer,
                               "pass": err < 5e-2 && err_decode < 5e-2}),
        );
    }
}

/// One architecture loaded from `dir` (a random checkpoint `bench/gpu.sh shapes` writes) on the
/// CPU (f32, the reference) and on CUDA (bf16), both NF4: the prompt's logits, decode steps one
/// token at a time, and 16 sequences decoded in one batch, each against the CPU's logits for
/// the same positions. Widths that are not a power of two times 64 bytes (SmolLM2's 576,
/// Phi-3's head dim 96) are what this pins: CubeCL pads such rows unless asked not to.
fn compare_one<A: Architecture>(arch: &str, dir: &std::path::Path, device: &Device) {
    let cpu = load_on::<A, Cpu>(dir, Default::default(), "cpu", Quantization::Nf4);
    for pool in [false, true] {
        // With a pool every sequence's cache is a slot of one buffer per layer (the server's
        // path: `--max-batch`); without, each grows on its own.
        let gpu = load_batched::<A, CudaBf16>(
            dir,
            device.clone(),
            "cuda",
            Quantization::Nf4,
            if pool { 16 } else { 0 },
        );
        compare_with::<A>(arch, dir, &cpu, &gpu, pool);
    }
}

fn compare_with<A: Architecture>(
    arch: &str,
    dir: &std::path::Path,
    cpu: &A::Model<Cpu>,
    gpu: &A::Model<CudaBf16>,
    pool: bool,
) {
    let vocab = cpu.vocab_size();
    let ids = |n: usize, seed: u64| -> Vec<u32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % vocab as u64) as u32
            })
            .collect()
    };
    let cpu_rows = |tokens: &[u32]| {
        let mut cache = KvCache::new(cpu.num_layers());
        to_vec(cpu.forward(tokens, &mut cache, true))
    };
    // The prompt in one pass, all rows (the tensor-core kernel's token tiles; with the pool,
    // attention row by row).
    let prompt = ids(32, 1);
    let want = cpu_rows(&prompt);
    let mut cache = KvCache::new(gpu.num_layers());
    let prefill = rel_l2(&to_vec(gpu.forward(&prompt, &mut cache, true)), &want);
    // Each cache given back (a pool slot each): the 16 sequences below take all 16.
    drop(cache);
    // A prompt past the token tiles and the row-by-row attention: dequantize + matmul, Burn's
    // attention.
    let long = ids(80, 2);
    let mut cache = KvCache::new(gpu.num_layers());
    let prefill_long = rel_l2(
        &to_vec(gpu.forward(&long, &mut cache, true)),
        &cpu_rows(&long),
    );
    drop(cache);
    // The first 16 prefilled (the GEMV path), the last 16 one per step (the decode kernels).
    let mut cache = KvCache::new(gpu.num_layers());
    let _ = gpu.forward(&prompt[..16], &mut cache, false);
    let mut rows = Vec::new();
    for &t in &prompt[16..] {
        rows.extend(to_vec(gpu.forward(&[t], &mut cache, false)));
    }
    let decode = rel_l2(&rows, &want[16 * vocab..]);
    drop(cache);
    // 16 sequences of different lengths prefilled alone, then 4 steps decoded together (the
    // multi-row GEMV, each sequence over its own cache).
    let seqs: Vec<Vec<u32>> = (0..16)
        .map(|i| ids(5 + i % 8 + 4, 100 + i as u64))
        .collect();
    let mut caches: Vec<KvCache<CudaBf16>> = seqs
        .iter()
        .map(|s| {
            let mut c = KvCache::new(gpu.num_layers());
            let _ = gpu.forward(&s[..s.len() - 4], &mut c, false);
            c
        })
        .collect();
    let mut got = vec![Vec::new(); seqs.len()];
    for step in 0..4 {
        let toks: Vec<Vec<u32>> = seqs.iter().map(|s| vec![s[s.len() - 4 + step]]).collect();
        let mut batch =
            llm_core::engine::SeqChunk::zip(toks.iter().map(|t| t.as_slice()), caches.iter_mut());
        let out = to_vec(gpu.forward_batch(&mut batch, false));
        for (i, g) in got.iter_mut().enumerate() {
            g.extend_from_slice(&out[i * vocab..(i + 1) * vocab]);
        }
    }
    let (mut got_all, mut want_all) = (Vec::new(), Vec::new());
    for (s, g) in seqs.iter().zip(&got) {
        let w = cpu_rows(s);
        want_all.extend_from_slice(&w[(s.len() - 4) * vocab..]);
        got_all.extend_from_slice(g);
    }
    let batch16 = rel_l2(&got_all, &want_all);
    // A mixed step: 15 of them decode one more token while a newcomer's 6-token prompt joins
    // (with the pool it takes the slot the 16th gave back).
    caches.truncate(15);
    let extra = ids(15, 7);
    let newcomer = ids(6, 8);
    let mut chunks: Vec<Vec<u32>> = extra.iter().map(|&t| vec![t]).collect();
    chunks.push(newcomer.clone());
    let mut new_cache = KvCache::new(gpu.num_layers());
    let mut batch: Vec<llm_core::engine::SeqChunk<'_, CudaBf16>> = chunks[..15]
        .iter()
        .zip(caches.iter_mut())
        .map(|(t, cache)| llm_core::engine::SeqChunk { tokens: t, cache })
        .collect();
    batch.push(llm_core::engine::SeqChunk {
        tokens: &chunks[15],
        cache: &mut new_cache,
    });
    let got_mixed = to_vec(gpu.forward_batch(&mut batch, false));
    let mut want_mixed = Vec::new();
    for (s, &t) in seqs.iter().zip(&extra) {
        let mut full = s.clone();
        full.push(t);
        want_mixed.extend_from_slice(&cpu_rows(&full)[s.len() * vocab..]);
    }
    want_mixed.extend_from_slice(&cpu_rows(&newcomer)[5 * vocab..]);
    let mixed = rel_l2(&got_mixed, &want_mixed);
    let worst = prefill
        .max(prefill_long)
        .max(decode)
        .max(batch16)
        .max(mixed);
    emit(
        "cuda_vs_cpu_rel_err",
        arch,
        worst,
        "rel_l2",
        serde_json::json!({"checkpoint": dir.display().to_string(), "quantization": "nf4",
                           "kv_pool": pool, "prefill_32": prefill, "prefill_80": prefill_long,
                           "decode_16": decode,
                           "batch_16x4": batch16, "mixed_15_decode_1_prompt": mixed,
                           "pass": worst < 5e-2}),
    );
}

/// The prefill path of an NF4 linear (more rows than the GEMV takes: dequantize, then Burn's
/// dense matmul) on each projection shape of a Llama-3.1-8B layer, both weight layouts:
/// `nk` multiplies by a transposed view of the `[out, in]` dequantized weight, `kn` by the
/// `[in, out]` transpose [`CudaNf4Linear::dequantize_t`] writes. The two dequantized weights
/// must agree exactly and the two outputs closely; then each step is timed on the device, and
/// the seven projections of a layer summed, times 32 layers: the linears' share of a prompt.
fn prefill(device: &Device) {
    use std::sync::atomic::Ordering::Relaxed;
    // cuBLAS is the server's default where it loads (llm_core::driver); here one of the paths.
    llm_core::driver::USE_CUBLAS.store(true, Relaxed);
    // (out, in, projections of this shape per layer)
    let shapes = [
        (4096usize, 4096usize, 2usize),
        (1024, 4096, 2),
        (14336, 4096, 2),
        (4096, 14336, 1),
    ];
    for rows in [128usize, 512] {
        let mut layer = [0f64; 3];
        for &(n, k, count) in &shapes {
            let shape = format!("{n}x{k}");
            let w = randn(n * k, (n * 31 + k) as u64, 0.04);
            let q = Nf4Weight::quantize(&w, n, k, true, WeightDtype::BF16);
            let gpu = CudaNf4Linear::new(q, None, device);
            let xs = randn_bf16(rows * k, (rows * 7 + n) as u64, 1.0);
            let x = Tensor::<CudaBf16, 2>::from_data(TensorData::new(xs, [rows, k]), device);
            let same = to_vec(gpu.dequantize().transpose()) == to_vec(gpu.dequantize_t());
            let flops = 2.0 * (rows * n * k) as f64;
            let mut outs = Vec::new();
            for (i, layout) in ["nk", "kn"].into_iter().enumerate() {
                llm_core::cuda::DEQUANT_TRANSPOSED.store(layout == "kn", Relaxed);
                outs.push(to_vec(gpu.forward_dequant(x.clone())));
                // The transposed view of `nk` costs no kernel: dequantize alone is timed.
                let dequant = device_us(device, 20, || {
                    let _ = gpu.dequantized_rhs();
                });
                let rhs = gpu.dequantized_rhs();
                let matmul = device_us(device, 20, || {
                    let _ = x.clone().matmul(rhs.clone());
                });
                let total = device_us(device, 20, || {
                    let _ = gpu.forward_dequant(x.clone());
                });
                layer[i] += count as f64 * total;
                emit(
                    "nf4_prefill_linear",
                    &shape,
                    total,
                    "us",
                    serde_json::json!({"rows": rows, "layout": layout, "dequant_us": dequant,
                                       "matmul_us": matmul, "matmul_tflops": flops / (matmul * 1e-6) / 1e12,
                                       "dequant_t_equals_transpose": same,
                                       "timing": "device"}),
                );
            }
            // cuBLAS (the server's default where it loads): dequantize `[out, in]`,
            // `cublasGemmEx` on CubeCL's stream (`llm_core::driver`); wall time. A failed call
            // turns cuBLAS off (said on stderr).
            let cublas = llm_core::driver::available()
                .then(|| gpu.forward_cublas(x.clone()))
                .flatten();
            if let Some(y) = cublas {
                let y = to_vec(y);
                let err = rel_l2(&y, &outs[0]);
                let dequant = device_us(device, 20, || {
                    let _ = gpu.dequantize();
                });
                let total = wall_us(device, 20, || {
                    let _ = gpu.forward_cublas(x.clone());
                });
                layer[2] += count as f64 * total;
                emit(
                    "nf4_prefill_linear",
                    &shape,
                    total,
                    "us",
                    serde_json::json!({"rows": rows, "layout": "cublas", "dequant_us": dequant,
                                       "gemm_and_waits_us": total - dequant,
                                       "tflops_excluding_dequant": flops / ((total - dequant) * 1e-6) / 1e12,
                                       "rel_err_vs_burn_nk": err, "pass": err < 1e-2,
                                       "timing": "wall"}),
                );
            } else {
                emit(
                    "nf4_prefill_linear",
                    &shape,
                    f64::NAN,
                    "us",
                    serde_json::json!({"rows": rows, "layout": "cublas",
                                       "error": "cuBLAS not loaded (libcublas.so.13 not on the loader path, or LLM_CUDA_GEMM=burn) or its call failed (stderr)"}),
                );
            }
            let err = rel_l2(&outs[1], &outs[0]);
            emit(
                "nf4_prefill_layouts_rel_err",
                &shape,
                err,
                "rel_l2",
                serde_json::json!({"rows": rows, "pass": same && err < 1e-2}),
            );
        }
        for (i, layout) in ["nk", "kn", "cublas"].into_iter().enumerate() {
            if layer[i] == 0.0 {
                continue;
            }
            emit(
                "nf4_prefill_linears_32_layers",
                "llama-3.1-8b-instruct",
                32.0 * layer[i] / 1000.0,
                "ms",
                serde_json::json!({"rows": rows, "layout": layout, "timing": "device"}),
            );
        }
    }
    llm_core::cuda::DEQUANT_TRANSPOSED.store(true, Relaxed);
    llm_core::driver::USE_CUBLAS.store(false, Relaxed);
}

/// The tiled code layout (`llm_core::nf4::tile_codes`) through every NF4 path at odd shapes:
/// rows not a multiple of 16 (padded tiles), `k` an odd multiple of 64 (a half-width last
/// window: SmolLM2's 576). Each against the CPU at 1, 3, 8 and 20 tokens (one-token GEMV, SIMT
/// or MMA GEMV, dequantize + matmul) and both dequantizations against the CPU's.
fn layout(device: &Device) {
    for (n, k) in [
        (40usize, 576usize),
        (13, 192),
        (24, 256),
        (1000, 4096),
        (72, 1536),
    ] {
        let shape = format!("{n}x{k}");
        let w = randn(n * k, (n * 13 + k) as u64, 0.04);
        let q = Nf4Weight::quantize(&w, n, k, true, WeightDtype::BF16);
        let dense = q.dequantize();
        let cpu = HostLinear::<Cpu>::nf4(q.clone(), None, Default::default());
        let gpu = CudaNf4Linear::new(q, None, device);
        let got = to_vec(gpu.dequantize());
        let err = rel_l2(&got, &dense);
        emit(
            "layout_dequantize",
            &shape,
            err,
            "rel_l2",
            serde_json::json!({"pass": err < 1e-2}),
        );
        let got_t = to_vec(gpu.dequantize_t());
        let back: Vec<f32> = (0..n * k).map(|i| got_t[(i % k) * n + i / k]).collect();
        let err = rel_l2(&back, &dense);
        emit(
            "layout_dequantize_t",
            &shape,
            err,
            "rel_l2",
            serde_json::json!({"pass": err < 1e-2}),
        );
        for b in [1usize, 3, 8, 20] {
            let xs = randn_bf16(b * k, (b * 5 + n) as u64, 1.0);
            let want = to_vec(cpu.forward(Tensor::from_data(
                TensorData::new(xs.clone(), [b, k]),
                &Default::default(),
            )));
            let xg = Tensor::<CudaBf16, 2>::from_data(TensorData::new(xs, [b, k]), device);
            let got = to_vec(Linear::forward(&gpu, xg));
            let err = rel_l2(&got, &want);
            emit(
                "layout_forward",
                &shape,
                err,
                "rel_l2",
                serde_json::json!({"rows": b, "pass": err < 1e-2}),
            );
        }
    }
}

fn main() {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    // Compiled kernels and autotune results on disk (gpu.sh sets it): each llm-bench process
    // otherwise compiles every kernel again, minutes on a fresh machine.
    let cache = std::env::var_os("LLM_BENCH_KERNEL_CACHE").map(std::path::PathBuf::from);
    llm_core::cuda::use_kernel_cache(cache.as_deref());
    let device = llm_core::cuda::parse_device("cuda").unwrap();
    llm_core::cuda::probe_mma(&device);
    if what == "tiny" || what == "all" {
        // `llm-bench tiny ARCH` runs one architecture.
        let only = std::env::args().nth(2);
        let run = |arch: &str| only.as_deref().is_none_or(|o| o == arch);
        if run("llama") {
            tiny_one::<llama_backend::Llama>("llama", &device);
        }
        if run("phi3") {
            tiny_one::<phi3_backend::Phi3>("phi3", &device);
        }
        if run("gemma2") {
            tiny_one::<gemma2_backend::Gemma2>("gemma2", &device);
        }
        if run("qwen2") {
            tiny_one::<qwen2_backend::Qwen2>("qwen2", &device);
        }
        if run("mixtral") {
            tiny_one::<mixtral_backend::Mixtral>("mixtral", &device);
        }
    }
    if what == "fused" || what == "kernel" || what == "all" {
        fused(&device);
        fused_attention(&device);
        chunk_attention(&device);
        fused_kv_append(&device);
        fused_projections(&device);
    }
    if what == "kernel" || what == "sweep" || what == "all" {
        kernel(&device, what == "sweep");
    }
    if what == "gemv" {
        gemv_for_ncu(&device);
    }
    if what == "prefill" {
        prefill(&device);
    }
    if what == "compare" {
        // `llm-bench compare ARCH DIR`.
        let arg = |i| std::env::args().nth(i).expect("llm-bench compare ARCH DIR");
        let (arch, dir) = (arg(2), std::path::PathBuf::from(arg(3)));
        match arch.as_str() {
            "llama" => compare_one::<llama_backend::Llama>(&arch, &dir, &device),
            "phi3" => compare_one::<phi3_backend::Phi3>(&arch, &dir, &device),
            "gemma2" => compare_one::<gemma2_backend::Gemma2>(&arch, &dir, &device),
            "qwen2" => compare_one::<qwen2_backend::Qwen2>(&arch, &dir, &device),
            "mixtral" => compare_one::<mixtral_backend::Mixtral>(&arch, &dir, &device),
            other => panic!("unknown architecture {other}"),
        }
    }
    if what == "layout" {
        layout(&device);
    }
    if what == "upload" {
        upload(&device);
    }
}

/// Where a load's host-to-device time goes (8B: "float tensors" 5.3 s for ~2 GB of embedding
/// and lm_head, "NF4 upload" 3.9 s for ~4.5 GB, docs/benchmarks.md run 13): 1 GiB of bf16
/// uploaded as one `Tensor::from_data` (CubeCL stages it through pinned memory), the same in
/// 64 MiB pieces joined on the device, the host copy alone, and an 8B down-projection's NF4
/// weight uploaded as `CudaNf4Linear::new` does. Wall time, synchronised.
fn upload(device: &Device) {
    let gib = 1usize << 30;
    let bytes: Vec<u8> = (0..gib).map(|i| (i % 251) as u8).collect();
    let rows = gib / 2 / 4096;
    let timed = |f: Box<dyn FnOnce() + '_>| {
        let t0 = Instant::now();
        f();
        sync(device);
        t0.elapsed().as_secs_f64()
    };
    let host_copy = timed(Box::new(|| {
        std::hint::black_box(bytes.to_vec());
    }));
    emit(
        "upload_host_copy_1gib",
        "-",
        host_copy,
        "s",
        serde_json::json!({}),
    );
    for attempt in 0..2 {
        let data =
            TensorData::from_bytes_vec(bytes.clone(), [rows, 4096], burn_tensor::DType::BF16);
        let whole = timed(Box::new(|| {
            std::hint::black_box(Tensor::<CudaBf16, 2>::from_data(data, device));
        }));
        emit(
            "upload_bf16_1gib_whole",
            "-",
            whole,
            "s",
            serde_json::json!({"attempt": attempt, "GBps": gib as f64 / whole / 1e9}),
        );
    }
    // The load's path since run 14 (`llm_core::driver::copy_in`): the driver copies from the
    // host buffer as it is (here one already written; at load, the checkpoint's mapping).
    for attempt in 0..2 {
        let direct = timed(Box::new(|| {
            use burn_cubecl::cubecl::prelude::Runtime;
            let client = burn_cubecl::cubecl::cuda::CudaRuntime::client(device);
            std::hint::black_box(
                llm_core::driver::copy_in(&client, device, &bytes).expect("copy_in"),
            );
        }));
        emit(
            "upload_copy_in_1gib",
            "-",
            direct,
            "s",
            serde_json::json!({"attempt": attempt, "GBps": gib as f64 / direct / 1e9}),
        );
    }
    // The bytes must arrive as they left: the load's own call (`float_from_bytes`: copy_in,
    // staged through pinned buffers past 1 MiB) read back and compared, whole and at a size
    // that ends mid-buffer (the staging's last, partial piece).
    {
        use llm_core::backend::LlmBackend;
        for len in [gib, (40 << 20) + 6] {
            let t: Tensor<CudaBf16, 2> = CudaBf16::float_from_bytes(
                &bytes[..len],
                burn_tensor::DType::BF16,
                [1, len / 2],
                device,
            );
            let back = t.into_data();
            let equal = back.as_bytes() == &bytes[..len];
            emit(
                "upload_float_from_bytes_roundtrip_equal",
                "-",
                equal as u8 as f64,
                "bool",
                serde_json::json!({"bytes": len}),
            );
            assert!(
                equal,
                "float_from_bytes of {len} bytes read back differently"
            );
        }
    }
    // f32 and f16 checkpoints' float tensors: uploaded as stored and rounded to bf16 on the
    // device; the result must equal the host's rounding (Burn's `TensorData::convert`, the
    // path before) bit for bit, infinities, subnormals and overflow included (NaN only as NaN:
    // its payload is the converter's choice).
    {
        use llm_core::backend::LlmBackend;
        let n = (3 << 20) + 5;
        let mut f = randn(n, 11, 3.0);
        f[..8].copy_from_slice(&[
            f32::NAN,
            f32::INFINITY,
            -f32::INFINITY,
            1e-40,
            -0.0,
            1.0 + f32::EPSILON * 64.0,
            3.0e38,
            -1.17e-38,
        ]);
        for (dtype, data) in [
            (burn_tensor::DType::F32, TensorData::new(f.clone(), [1, n])),
            (
                burn_tensor::DType::F16,
                TensorData::new(f.clone(), [1, n]).convert::<half::f16>(),
            ),
        ] {
            let t: Tensor<CudaBf16, 2> =
                CudaBf16::float_from_bytes(data.as_bytes(), dtype, [1, n], device);
            let got = t.into_data().convert::<half::bf16>();
            let host = data.convert::<half::bf16>();
            let same = |(a, b): (&half::bf16, &half::bf16)| {
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
            };
            let got = got.as_slice::<half::bf16>().unwrap();
            let want = host.as_slice::<half::bf16>().unwrap();
            let differ = got.iter().zip(want).filter(|&p| !same(p)).count();
            emit(
                "upload_float_from_bytes_rounded_equal",
                "-",
                (differ == 0 && got.len() == n) as u8 as f64,
                "bool",
                serde_json::json!({"dtype": format!("{dtype:?}"), "values": n, "differ": differ}),
            );
            assert!(
                differ == 0 && got.len() == n,
                "{dtype:?} float_from_bytes rounds {differ} values unlike the host"
            );
        }
    }
    let pieces = timed(Box::new(|| {
        let piece = 64usize << 20;
        let parts: Vec<Tensor<CudaBf16, 2>> = bytes
            .chunks(piece)
            .map(|c| {
                let data = TensorData::from_bytes_vec(
                    c.to_vec(),
                    [c.len() / 2 / 4096, 4096],
                    burn_tensor::DType::BF16,
                );
                Tensor::from_data(data, device)
            })
            .collect();
        std::hint::black_box(Tensor::cat(parts, 0));
    }));
    emit(
        "upload_bf16_1gib_64mib_pieces",
        "-",
        pieces,
        "s",
        serde_json::json!({"GBps": gib as f64 / pieces / 1e9}),
    );
    let (n, k) = (4096usize, 14336usize);
    let w = randn(n * k, 5, 0.04);
    let q = Nf4Weight::quantize(&w, n, k, true, WeightDtype::BF16);
    let nf4_bytes = q.packed.len() + 4 * n * k / 64;
    // A load's path (`LlmBackend::nf4_linear`: the copies queued to the upload thread, the
    // double-quantized absmax expanded there, then `finish_uploads`) against the synchronous
    // `CudaNf4Linear::new`: the two weights must dequantize to the same bits.
    {
        use llm_core::backend::LlmBackend;
        let direct = CudaNf4Linear::new(q.clone(), None, device);
        let t0 = Instant::now();
        let queued = CudaBf16::nf4_linear(q.clone(), None, device);
        let queued_s = t0.elapsed().as_secs_f64();
        CudaBf16::finish_uploads(device).expect("queued copies");
        let total_s = t0.elapsed().as_secs_f64();
        // The same kernels on the same input: equal bits unless the weights differ.
        let x =
            Tensor::<CudaBf16, 2>::from_data(TensorData::new(randn(4 * k, 9, 1.0), [4, k]), device);
        let got = to_vec(queued.forward(x.clone()));
        let want = to_vec(direct.forward(x));
        let equal = got == want;
        emit(
            "upload_nf4_linear_queued_equal",
            &format!("{n}x{k}"),
            equal as u8 as f64,
            "bool",
            serde_json::json!({"queue_s": queued_s, "with_wait_s": total_s,
                               "GBps": nf4_bytes as f64 / total_s / 1e9}),
        );
        assert!(equal, "the queued NF4 upload differs from the direct one");
    }
    for attempt in 0..3 {
        let q = q.clone();
        let t = timed(Box::new(|| {
            std::hint::black_box(CudaNf4Linear::new(q, None, device));
        }));
        emit(
            "upload_nf4_linear",
            &format!("{n}x{k}"),
            t,
            "s",
            serde_json::json!({"attempt": attempt, "device_bytes": nf4_bytes,
                               "GBps": nf4_bytes as f64 / t / 1e9}),
        );
    }
}
