//! Helpers for parity tests against `tests/fixtures` (golden data from the reference
//! implementations; see tests/fixtures/README.md for the tolerances).

use std::path::PathBuf;

use burn_tensor::backend::Backend;
use burn_tensor::Tensor;

/// `tests/fixtures` of this repository: the one it was built from, or, where that is gone (a
/// binary carried to another machine, as `bench/gpu.sh` runs `llm-bench`), the one in the
/// current directory.
pub fn fixtures() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    if built.exists() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    }
}

/// Relative L2 error `|a - b| / |b|`, computed in f64.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Flatten a tensor to host f32s.
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().expect("f32 data")
}

/// The default model's GGUF (SmolLM2-135M-Instruct), fetched by `scripts/fetch-default-model.sh`
/// on first use.
pub fn default_model() -> PathBuf {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-default-model.sh");
    let out = std::process::Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

use crate::backend::LlmBackend;
use crate::engine::{CausalLm, SeqChunk};
use crate::export::{Architecture, Cpu, LoadOptions};
use crate::weights::{LoadCtx, Quantization};
use crate::KvCache;
use llm_formats::{ModelSource, SafetensorsDir, TensorStore};

/// Load `A` from `path` on the CPU backend, as the plugin would.
pub fn load_cpu<A: Architecture>(
    path: &std::path::Path,
    quantization: Quantization,
) -> A::Model<Cpu> {
    load_on::<A, Cpu>(path, Default::default(), "cpu", quantization)
}

/// Load `A` from `path` on backend `B`'s `device` (`device_name` as LoadModel spells it).
pub fn load_on<A: Architecture, B: LlmBackend>(
    path: &std::path::Path,
    device: B::Device,
    device_name: &str,
    quantization: Quantization,
) -> A::Model<B> {
    load_batched::<A, B>(path, device, device_name, quantization, 0)
}

/// [`load_on`] for `max_batch` sequences at once (a backend with a KV pool reserves it).
pub fn load_batched<A: Architecture, B: LlmBackend>(
    path: &std::path::Path,
    device: B::Device,
    device_name: &str,
    quantization: Quantization,
    max_batch: usize,
) -> A::Model<B> {
    let source = ModelSource::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ctx = LoadCtx {
        store: source.tensors(),
        device,
        quantization,
        source: source.describe(),
        timers: Default::default(),
    };
    let opts = LoadOptions {
        source: path.to_path_buf(),
        device: device_name.into(),
        quantization: quantization.name().into(),
        // A pool of `max_batch` slots of the whole context: capped to keep it small.
        max_context: if max_batch > 0 { 512 } else { 0 },
        max_batch,
        kernel_cache: None,
    };
    let model = A::load::<B>(source.config(), &ctx, &opts);
    B::finish_uploads(&ctx.device).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    model.unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `tests/fixtures/tiny/<arch>/reference.safetensors`.
pub struct TinyReference {
    st: SafetensorsDir,
}

impl TinyReference {
    pub fn open(arch: &str) -> TinyReference {
        TinyReference {
            st: SafetensorsDir::open_file(
                &fixtures()
                    .join("tiny")
                    .join(arch)
                    .join("reference.safetensors"),
            )
            .unwrap(),
        }
    }
    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.st
            .ints(name)
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect()
    }
    pub fn has(&self, name: &str) -> bool {
        self.st.contains(name)
    }
    pub fn floats(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let t = self.st.f32(name).unwrap();
        (t.shape, t.data)
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Prompt logits (all positions) vs `logits_key`: returns the relative L2 error.
pub fn prompt_logits_error<M: CausalLm<Cpu>>(
    model: &M,
    r: &TinyReference,
    logits_key: &str,
) -> f64 {
    let input = r.ids("input_ids");
    let mut cache = KvCache::new(model.num_layers());
    let logits = to_vec(model.forward(&input, &mut cache, true));
    rel_l2(&logits, &r.floats(logits_key).1)
}

/// Greedy continuation with the KV cache, as many tokens as `greedy_key` holds (no EOS stop).
pub fn greedy<M: CausalLm<Cpu>>(model: &M, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = KvCache::new(model.num_layers());
    let mut last = to_vec(model.forward(prompt, &mut cache, false));
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&last);
        out.push(next);
        if out.len() == n {
            break;
        }
        last = to_vec(model.forward(&[next], &mut cache, false));
    }
    out
}

/// Greedy decode of several prompts two ways: each alone, and all in one batch where prompt
/// `k` joins at step `k` (its prefill shares a forward with the others' decode rows, as under
/// continuous batching). Every step's logits must be equal bit for bit: on the CPU a row's
/// arithmetic does not depend on the rows beside it.
pub fn assert_batch_equals_alone<M: CausalLm<Cpu>>(model: &M, prompts: &[Vec<u32>], steps: usize) {
    let vocab = model.vocab_size();
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let mut cache = KvCache::new(model.num_layers());
            let mut out = vec![to_vec(model.forward(p, &mut cache, false))];
            while out.len() < steps {
                let next = argmax(out.last().expect("one step"));
                out.push(to_vec(model.forward(&[next], &mut cache, false)));
            }
            out
        })
        .collect();
    let mut caches: Vec<KvCache<Cpu>> = prompts
        .iter()
        .map(|_| KvCache::new(model.num_layers()))
        .collect();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
    let mut step = 0;
    while got.iter().any(|g| g.len() < steps) {
        let active: Vec<usize> = (0..prompts.len())
            .filter(|&k| k <= step && got[k].len() < steps)
            .collect();
        let tokens: Vec<Vec<u32>> = active
            .iter()
            .map(|&k| match got[k].last() {
                None => prompts[k].clone(),
                Some(last) => vec![argmax(last)],
            })
            .collect();
        let mut batch = SeqChunk::zip(
            tokens.iter().map(Vec::as_slice),
            caches
                .iter_mut()
                .enumerate()
                .filter(|(k, _)| active.contains(k))
                .map(|(_, cache)| cache),
        );
        let logits = to_vec(model.forward_batch(&mut batch, false));
        assert_eq!(logits.len(), active.len() * vocab);
        for (j, &k) in active.iter().enumerate() {
            got[k].push(logits[j * vocab..(j + 1) * vocab].to_vec());
        }
        step += 1;
    }
    for (k, (got, alone)) in got.iter().zip(&alone).enumerate() {
        for (s, (g, a)) in got.iter().zip(alone).enumerate() {
            assert!(
                g == a,
                "prompt {k}, step {s}: batched logits differ from alone (rel L2 {})",
                rel_l2(g, a)
            );
        }
    }
}

/// [`assert_batch_equals_alone`] for `tiny/<arch>/bf16` quantized to NF4 on load, with three
/// prompts of different lengths made from the fixture's `input_ids`, six steps each.
pub fn assert_tiny_batch_equals_alone<A: Architecture>(arch: &str) {
    let model = load_cpu::<A>(
        &fixtures().join("tiny").join(arch).join("bf16"),
        Quantization::Nf4,
    );
    let ids = TinyReference::open(arch).ids("input_ids");
    let reversed: Vec<u32> = ids.iter().rev().copied().collect();
    assert_batch_equals_alone(&model, &[ids.clone(), ids[..3].to_vec(), reversed], 6);
}

/// Teacher-forced decode with the KV cache against `full_logits_f32`: the worst rel. L2 error
/// over the decode steps.
pub fn kv_decode_error<M: CausalLm<Cpu>>(model: &M, r: &TinyReference) -> f64 {
    let input = r.ids("input_ids");
    let greedy = r.ids("greedy_f32");
    let (shape, full) = r.floats("full_logits_f32");
    let vocab = shape[1];
    let mut cache = KvCache::new(model.num_layers());
    let mut last = to_vec(model.forward(&input, &mut cache, false));
    let mut worst = 0f64;
    for (step, &tok) in greedy.iter().enumerate() {
        let p = input.len() - 1 + step;
        worst = worst.max(rel_l2(&last, &full[p * vocab..(p + 1) * vocab]));
        last = to_vec(model.forward(&[tok], &mut cache, false));
    }
    worst
}

/// `A::describe` of `config_dir/config.json` prints exactly `tests/fixtures/describe/<fixture>.{nf4,bf16}.txt`
/// (transformers 4.48.3 `print(model)`) and counts the footprints of `footprints.json`.
pub fn assert_describe<A: Architecture>(config_dir: &std::path::Path, fixture: &str) {
    use crate::describe::{footprint_text, Describer};
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let config: serde_json::Value =
        serde_json::from_str(&read(config_dir.join("config.json"))).expect("config.json");
    let footprints: serde_json::Value =
        serde_json::from_str(&read(fixtures().join("describe/footprints.json"))).unwrap();
    let want = &footprints[fixture];
    for (quantized, suffix) in [(true, "nf4"), (false, "bf16")] {
        let d = A::describe(&config, &Describer { quantized }, fixture)
            .unwrap_or_else(|e| panic!("{fixture}: {e}"));
        let text = read(fixtures().join(format!("describe/{fixture}.{suffix}.txt")));
        assert_eq!(
            d.tree.render(),
            text.trim_end(),
            "{fixture} {suffix}: print(model) differs"
        );
        let bytes = d.tree.footprint(2);
        assert_eq!(
            Some(bytes),
            want[format!("{suffix}_footprint_bytes")].as_u64(),
            "{fixture} {suffix}: footprint"
        );
        if quantized {
            assert_eq!(
                Some(footprint_text(bytes).as_str()),
                want["nf4_footprint_MB_text"].as_str(),
                "{fixture}: footprint text"
            );
        }
    }
}
