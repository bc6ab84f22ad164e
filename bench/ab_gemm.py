#!/usr/bin/env python3
"""Prefill GEMMs on Burn's matmul against cuBLAS in the real server (bench/gpu.sh ab_gemm).

The 8B random checkpoint of full.py; one server process per setting of LLM_CUDA_GEMM, in the
order of GEMMS (default "cublas,burn"), sharing one kernel cache (the first load of a fresh
machine compiles for minutes, the next one reuses it). Each: load (its phases), driver memory,
TTFT of a 32-token and of a 512-token prompt (each the second of two runs: the first autotunes
the shape), decode tok/s at batch 1, driver memory after unload. One JSON object per figure.
"""
import json, os, time

from full import CKPT, Server, ensure_checkpoint, log, toks, ttft
from smoke import used_mb


def emit(metric, value, unit, **extra):
    print(json.dumps({"metric": metric, "model": "llama-3.1-8b-instruct", "value": value,
                      "unit": unit, **extra}), flush=True)


def main():
    ensure_checkpoint()
    kernels = "/tmp/llm-kernels"
    short = ",".join(str(1000 + i) for i in range(32))
    long_prompt = ",".join(str(1000 + (i * 37) % 120000) for i in range(512))
    for gemm in os.environ.get("GEMMS", "cublas,burn").split(","):
        base = used_mb()
        with Server(kernels, f"/tmp/server-{gemm}.log", {"LLM_CUDA_GEMM": gemm}) as s:
            t = s.load("big", CKPT, "--quantization", "nf4")
            emit("load_s", round(t, 2), "s", gemm=gemm, phases_ms=s.phases(),
                 note="kernel cache shared by the settings: the first is a cold one")
            emit("device_mb_after_load", used_mb() - base, "MB", gemm=gemm)
            for _ in range(2):
                g = s.generate("big", short)
            emit("ttft_ms_32", ttft(g), "ms", gemm=gemm)
            emit("decode_tok_s_b1", toks(g), "tok/s", gemm=gemm)
            for _ in range(2):
                g = s.generate("big", long_prompt, new=1)
            emit("ttft_ms_512", ttft(g), "ms", gemm=gemm)
            s.llm("unload", "big")
            time.sleep(1)
            emit("unload_residual_mb", used_mb() - base, "MB", gemm=gemm)
        log(f"{gemm} done")


if __name__ == "__main__":
    main()
