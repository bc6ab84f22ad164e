#!/usr/bin/env python3
"""The other four model shapes on the GPU (bench/gpu.sh models): Phi-3-mini, Gemma-2-2b,
Qwen2-7B and Mixtral-8x7B, each from a random checkpoint with its hub repo's exact layout,
through the real server binary and that architecture's plugin, against HF transformers +
bitsandbytes (the seed's recipe, bench/peer/bench_hf.py) in the same call.

Per model: make the checkpoint (bench/peer/make_random_checkpoint.py: bf16 shards; Gemma-2-2b
in float32 as its hub repo ships it; Mixtral pre-quantized NF4, since 93 GB of bf16 does not
fit the disk), run the peer (load, 512-token prefill, decode at batch 1), then ours: load
(quantize on load, or the bnb checkpoint as it is), driver memory, greedy decode at batch 1
(`llm generate --stats`), TTFT at 32 and 512 prompt tokens, unload; the checkpoint is deleted
before the next model. One kernel cache for the whole run (`--kernel-cache`), empty at the
start unless KEEP_KERNELS=1: the first model's load compiles the kernels all architectures
share.

  MODELS=gemma-2-2b-it,phi-3-mini-4k-instruct python3 bench/models.py

LONG=0 leaves out the 512-token TTFT (its first prompt autotunes the 512-row matmuls: minutes).

Prints one JSON object per figure ({"metric", "model", "value", "unit", "peer", "peer_value"}).
A model whose turn comes too close to FULL_TIMEOUT is skipped (logged).
"""
import json, os, shutil, subprocess, sys, time

from full import Server, log, toks, ttft  # same directory
from smoke import used_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = time.time()
BUDGET = float(os.environ.get("FULL_TIMEOUT", "520"))
# (checkpoint format, quantization asked of LoadModel)
FORMATS = {
    "gemma-2-2b-it": ("f32", "nf4"),
    "phi-3-mini-4k-instruct": ("bf16", "nf4"),
    "qwen2-7b-instruct": ("bf16", "nf4"),
    "mixtral-8x7b-instruct-v0.1": ("nf4", "auto"),
}
HF = "hf-transformers+bnb"
NEW = 128


def emitter(model):
    def emit(metric, value, unit, peer=None, peer_value=None, **extra):
        print(json.dumps({"metric": metric, "model": model, "value": value, "unit": unit,
                          "peer": peer, "peer_value": peer_value, **extra}), flush=True)
    return emit


def left():
    return BUDGET - (time.time() - START)


def one(model, kernels):
    fmt, quant = FORMATS[model]
    emit = emitter(model)
    ckpt = f"/tmp/ckpt-{model}"
    t = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "bench/peer/make_random_checkpoint.py"),
                    os.path.join(ROOT, "tests/fixtures/configs", model), ckpt, "--format", fmt],
                   check=True, stdout=sys.stderr)
    log(f"{model}: checkpoint ({fmt}) in {time.time() - t:.0f} s")
    peer = {}
    if os.environ.get("SKIP_PEER") != "1" and left() > 300:
        try:
            r = subprocess.run([sys.executable, os.path.join(ROOT, "bench/peer/bench_hf.py"), ckpt,
                                "/tmp/peer.json", "--batches", "1", "--new", "64"],
                               stdout=sys.stderr, stderr=sys.stderr, timeout=min(240, left() - 180))
            if r.returncode == 0:
                peer = json.load(open("/tmp/peer.json"))
            else:
                log(f"{model}: the peer failed (exit {r.returncode})")
        except subprocess.TimeoutExpired:
            log(f"{model}: the peer timed out")
        log("peer:", peer)
    ours(model, ckpt, quant, fmt, peer, kernels, emit)


def ours(model, ckpt, quant, fmt, peer, kernels, emit):
    base = used_mb()
    prompt = ",".join(str(1000 + i) for i in range(32))
    with Server(kernels, f"/tmp/server-{model}.log") as s:
        load_s = s.load("m", ckpt, "--quantization", quant)
        emit("load_s", round(load_s, 2), "s", HF, peer.get("load_s"), phases_ms=s.phases(),
             checkpoint=fmt, quantization=quant,
             note="kernel cache shared by this run's models (the first load fills it)")
        emit("device_mb_after_load", used_mb() - base, "MB", HF, peer.get("footprint_MB"),
             note="driver used memory minus the value before the server started; peer: get_memory_footprint")
        d = s.llm("describe", "m")
        log(d.stdout[-400:])
        for i in range(2):
            t = time.time()
            g = s.generate("m", prompt)
            if i == 0:
                emit("first_request_s", round(time.time() - t, 2), "s",
                     note=f"{NEW} tokens, the first request after the load")
        emit("decode_tok_s_b1", toks(g), "tok/s", HF, peer.get("decode_tok_s_b1"),
             ratio=round(toks(g) / peer["decode_tok_s_b1"], 2) if peer.get("decode_tok_s_b1") else None)
        emit("ttft_ms_32", ttft(g), "ms")
        if os.environ.get("LONG", "1") == "1" and left() > 90:
            long_prompt = ",".join(str(1000 + (i * 37) % 30000) for i in range(512))
            t = time.time()
            for i in range(2):
                g = s.generate("m", long_prompt, new=1)
                if i == 0:
                    log(f"{model}: first 512-token prompt {time.time() - t:.1f} s")
            emit("ttft_ms_512", ttft(g), "ms", "hf prefill_512_ms", peer.get("prefill_512_ms"))
        s.llm("unload", "m")


def main():
    models = os.environ.get("MODELS", ",".join(FORMATS)).split(",")
    kernels = "/tmp/llm-kernels"
    if os.environ.get("KEEP_KERNELS") != "1":  # 1: reuse what an earlier run on this machine left
        shutil.rmtree(kernels, ignore_errors=True)
    for model in models:
        # A checkpoint, the peer and a cold load take minutes: start only with time for them.
        if left() < 240:
            log(f"{model}: skipped, {left():.0f} s left")
            continue
        try:
            one(model, kernels)
        except (Exception, SystemExit) as e:  # a failed load raises SystemExit; the next model still runs
            log(f"{model}: failed: {e!r}")
        finally:  # the next model's checkpoint needs the disk (also after a failed write)
            shutil.rmtree(f"/tmp/ckpt-{model}", ignore_errors=True)
        log(f"{time.time() - START:.0f} s into the run")


if __name__ == "__main__":
    main()
