#!/usr/bin/env python3
"""Full-size GPU run (bench/gpu.sh full): Llama-3.1-8B-Instruct shape, NF4 double quant, bf16
compute, through the real server binary and plugin, against HF transformers + bitsandbytes (the
seed's recipe, bench/peer/bench_hf.py) in the same call.

1. A random bf16 checkpoint with the hub's exact layout (bench/peer/make_random_checkpoint.py).
2. The peer: from_pretrained with the bnb config, 512-token prefill, decode at batch 1 and 16.
3. Ours: llm-server --device cuda, `llm load` (quantize on load, timed), driver memory before /
   after load / after unload, DescribeModel's device memory, greedy decode at batch 1
   (`llm generate --stats`: TTFT and decode tok/s), TTFT of a 512-token prompt, and 16 concurrent
   streams (`llm bench --json`).

Prints one JSON object per figure ({"metric", "model", "value", "unit", "peer", "peer_value"}).
"""
import json, os, re, socket, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, ".gpu")
from smoke import free_port, used_mb  # same directory

CKPT = "/tmp/ckpt-llama-3.1-8b"
MODEL = "llama-3.1-8b-instruct"
NEW = 128


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def emit(metric, value, unit, peer=None, peer_value=None, **extra):
    print(json.dumps({"metric": metric, "model": MODEL, "value": value, "unit": unit,
                      "peer": peer, "peer_value": peer_value, **extra}), flush=True)


def main():
    if not os.path.exists(os.path.join(CKPT, "model.safetensors.index.json")):
        t = time.time()
        subprocess.run([sys.executable, os.path.join(ROOT, "bench/peer/make_random_checkpoint.py"),
                        os.path.join(ROOT, "tests/fixtures/configs", MODEL), CKPT], check=True,
                       stdout=sys.stderr)
        log(f"checkpoint in {time.time() - t:.0f} s")
    peer = {}
    if os.environ.get("SKIP_PEER") != "1":
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench/peer/bench_hf.py"), CKPT,
                            "/tmp/peer.json", "--batches", "1,16", "--new", "64"],
                           stdout=sys.stderr, stderr=sys.stderr, timeout=300)
        if r.returncode == 0:
            peer = json.load(open("/tmp/peer.json"))
        log("peer:", peer)
    hf = "hf-transformers+bnb"

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    llm = lambda *a, timeout=400: subprocess.run([os.path.join(GPU, "llm"), "--server", url, *a],
                                                 capture_output=True, text=True, timeout=timeout)
    base = used_mb()
    server = subprocess.Popen([os.path.join(GPU, "llm-server"), "--listen", f"127.0.0.1:{port}",
                               "--plugin-dir", GPU, "--device", "cuda", "--max-batch", "16",
                               "--max-context", "4096"], stdout=sys.stderr, stderr=sys.stderr)
    try:
        for _ in range(200):
            if llm("models").returncode == 0:
                break
            time.sleep(0.1)
        t = time.time()
        r = llm("load", "big", CKPT, "--device", "cuda", "--quantization", "nf4")
        load_s = time.time() - t
        log(r.stdout, r.stderr)
        if r.returncode != 0:
            raise SystemExit("load failed")
        emit("load_s", round(load_s, 2), "s", hf, peer.get("load_s"))
        after_load = used_mb()
        emit("device_mb_after_load", after_load - base, "MB", hf, peer.get("footprint_MB"),
             note="driver used memory minus the pre-start baseline; peer: get_memory_footprint")
        d = llm("describe", "big")
        log(d.stdout[-600:])
        prompt = ",".join(str(1000 + i) for i in range(32))
        for i in range(2):  # the load warmed the kernels up: the first run should be as fast
            t = time.time()
            g = llm("generate", "--model", "big", "--prompt-ids", prompt, "--max-new-tokens",
                    str(NEW), "--ignore-eos", "--ids", "--stats")
            if i == 0:
                emit("first_request_s", round(time.time() - t, 2), "s",
                     note=f"{NEW} tokens, the first request after the load")
            log(g.stderr[-400:])
        # `--stats`: "[length] prompt P tokens, generated N tokens, TTFT X ms, Y tok/s, seed S"
        ttft = lambda text: float(re.search(r"TTFT ([0-9.]+) ms", text).group(1))
        toks = lambda text: float(re.search(r"([0-9.]+) tok/s", text).group(1))
        emit("decode_tok_s_b1", toks(g.stderr), "tok/s", hf, peer.get("decode_tok_s_b1"))
        emit("ttft_ms_32", ttft(g.stderr), "ms")
        long_prompt = ",".join(str(1000 + (i * 37) % 120000) for i in range(512))
        for i in range(2):
            g = llm("generate", "--model", "big", "--prompt-ids", long_prompt, "--max-new-tokens",
                    "1", "--ignore-eos", "--ids", "--stats")
        log(g.stderr[-400:])
        emit("ttft_ms_512", ttft(g.stderr), "ms", "hf prefill_512_ms", peer.get("prefill_512_ms"))
        for c in (1, 16):
            b = llm("bench", "--model", "big", "--concurrency", str(c), "--requests", str(c * 2),
                    "--max-new-tokens", "64", "--prompt-ids", prompt, "--ignore-eos",
                    "--warmup", str(c), "--json")
            log(b.stdout[-800:], b.stderr[-400:])
            try:
                j = json.loads(b.stdout)
                emit(f"bench_tok_s_c{c}", j.get("tokens_per_second"), "tok/s", hf,
                     peer.get(f"decode_tok_s_b{c}"), report=j)
            except json.JSONDecodeError:
                log("bench output not JSON")
        r = llm("unload", "big")
        time.sleep(1)
        first = used_mb()
        emit("unload_residual_mb", first - base, "MB",
             note="driver used memory after unload minus the pre-start baseline (CUDA context included)")
        # Load/unload cycles of a small model in the same process (TINY_CYCLES, default ten):
        # driver memory after each.
        tiny = os.path.join(ROOT, "tests/fixtures/tiny/llama/nf4")
        after = []
        for i in range(int(os.environ.get("TINY_CYCLES", "10"))):
            llm("load", "t", tiny, "--device", "cuda")
            llm("generate", "--model", "t", "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                "--ids")
            llm("unload", "t")
            after.append(used_mb() - base)
            log(f"tiny cycle {i}: {after[-1]} MB over the baseline")
        emit("tiny_cycles_residual_mb", after[-1], "MB", cycles=after)
        if load_s < 60:
            # A second full cycle: the figure after it should equal the first (nothing kept).
            llm("load", "big", CKPT, "--device", "cuda", "--quantization", "nf4")
            emit("device_mb_after_load_2", used_mb() - base, "MB")
            llm("unload", "big")
            time.sleep(1)
            emit("unload_residual_mb_2", used_mb() - base, "MB",
                 note="after a second load/unload of the 8B model")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
