#!/usr/bin/env python3
"""CUDA against the CPU on real layer widths (bench/gpu.sh shapes).

The tiny fixtures have power-of-two widths; real models do not all: SmolLM2's hidden size 576
and kv width 192, Phi-3's head dim 96. CubeCL pads a row to a pitch when its byte width is not a
power of two, so a kernel that indexes flat must get a strictly contiguous buffer. Per shape: a
random bf16 checkpoint with that model's widths and few layers
(bench/peer/make_random_checkpoint.py), then `llm-bench compare ARCH DIR`: the prompt, decode
steps and a 16-sequence decode batch on CUDA (bf16) against the CPU (f32), both NF4.

  SHAPES=smollm2,phi3 python3 bench/shapes.py

Prints llm-bench's JSON lines (metric cuda_vs_cpu_rel_err, pass when < 5e-2).
"""
import json, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tests", "fixtures", "configs")
WORK = "/tmp/shapes"

# name: (architecture for llm-bench, config.json to start from, layers kept)
SHAPES = {
    "smollm2": ("llama", os.path.join(ROOT, "tests", "fixtures", "smollm2", "hf_config.json"), 4),
    "phi3": ("phi3", os.path.join(CONFIGS, "phi-3-mini-4k-instruct", "config.json"), 2),
    "llama8b": ("llama", os.path.join(CONFIGS, "llama-3.1-8b-instruct", "config.json"), 2),
    "qwen2": ("qwen2", os.path.join(CONFIGS, "qwen2-7b-instruct", "config.json"), 2),
    "gemma2": ("gemma2", os.path.join(CONFIGS, "gemma-2-2b-it", "config.json"), 2),
}


def main():
    wanted = os.environ.get("SHAPES", ",".join(SHAPES)).split(",")
    failed = 0
    for name in wanted:
        arch, config, layers = SHAPES[name]
        cfg = json.load(open(config))
        cfg["num_hidden_layers"] = layers
        # The GGUF's own settings (the fixture config was read from a GGUF).
        cfg.pop("quantization_config", None)
        cfg.pop("_model_name_or_path", None)
        cfg_dir = os.path.join(WORK, name, "config")
        ckpt = os.path.join(WORK, name, "ckpt")
        os.makedirs(cfg_dir, exist_ok=True)
        json.dump(cfg, open(os.path.join(cfg_dir, "config.json"), "w"), indent=1)
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "peer", "make_random_checkpoint.py"),
                        cfg_dir, ckpt], check=True, stdout=sys.stderr)
        r = subprocess.run([os.path.join(ROOT, ".gpu", "llm-bench"), "compare", arch, ckpt],
                           capture_output=True, text=True)
        sys.stderr.write(r.stderr[-3000:])
        for line in r.stdout.splitlines():
            if line.startswith("{"):
                o = json.loads(line)
                o["model"] = f"{name}-{layers}l"
                print(json.dumps(o), flush=True)
                failed += not o.get("pass", False)
        if r.returncode != 0:
            print(f"{name}: llm-bench exit {r.returncode}", file=sys.stderr)
            failed += 1
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
