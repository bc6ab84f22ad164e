//! The same weights stored every way an HF directory stores them load to the same model:
//! one bf16 file, f32 shards with model.safetensors.index.json, one f16 file.

use std::path::{Path, PathBuf};

use llama_backend::Llama;
use llm_core::formats::ModelSource;
use llm_core::testing::{fixtures, load_cpu, rel_l2, to_vec};
use llm_core::weights::Quantization;
use llm_core::{CausalLm, KvCache};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn logits(dir: &Path) -> Vec<f32> {
    let model = load_cpu::<Llama>(dir, Quantization::None);
    let mut cache = KvCache::new(model.num_layers());
    to_vec(model.forward(&[1, 5, 9, 200, 17, 3], &mut cache, true))
}

fn out_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llama-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(fixtures().join("tiny/llama/bf16").join(f), d.join(f)).unwrap();
    }
    d
}

/// Every tensor of the bf16 fixture, converted with `conv` to (dtype, bytes).
fn converted(conv: fn(f32) -> Vec<u8>, dtype: Dtype) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let src = ModelSource::open(&fixtures().join("tiny/llama/bf16")).unwrap();
    src.tensors()
        .names()
        .into_iter()
        .map(|n| {
            let t = src.tensors().f32(&n).unwrap();
            let bytes = t.data.iter().flat_map(|&x| conv(x)).collect();
            (n, dtype, t.shape, bytes)
        })
        .collect()
}

fn write(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn sharded_f32_and_single_f16_match_the_bf16_original() {
    let reference = logits(&fixtures().join("tiny/llama/bf16"));

    // f32, two shards + index.
    let dir = out_dir("f32-sharded");
    let all = converted(|x| x.to_le_bytes().to_vec(), Dtype::F32);
    let (a, b) = all.split_at(all.len() / 2);
    write(&dir.join("model-00001-of-00002.safetensors"), a);
    write(&dir.join("model-00002-of-00002.safetensors"), b);
    let mut map = serde_json::Map::new();
    for (n, ..) in a {
        map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (n, ..) in b {
        map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = logits(&dir);
    // bf16 values are exact in f32: identical numbers.
    assert_eq!(sharded, reference);
    let _ = std::fs::remove_dir_all(&dir);

    // f16: bf16 values of this range are exact in f16 as well.
    let dir = out_dir("f16");
    write(
        &dir.join("model.safetensors"),
        &converted(
            |x| half::f16::from_f32(x).to_le_bytes().to_vec(),
            Dtype::F16,
        ),
    );
    let f16 = logits(&dir);
    assert!(
        rel_l2(&f16, &reference) < 1e-6,
        "{}",
        rel_l2(&f16, &reference)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
