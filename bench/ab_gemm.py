#!/usr/bin/env python3
"""One server setting against another in the real server (bench/gpu.sh ab_gemm).

AB="VAR=a,b" picks the environment variable and its values (default
"LLM_CUDA_GEMM=cublas,burn": prefill GEMMs on cuBLAS against Burn's matmul; e.g.
"LLM_CUDA_MMA_ROWS=16,64": prompts and mixed steps of 17-64 rows through dequantize + matmul
against the tensor-core kernel's token tiles).
The 8B random checkpoint of full.py; one server process per value, in order, sharing one
kernel cache (the first load of a fresh machine compiles for minutes, the next one reuses it).
Each: load (its phases, the server's peak host memory), driver memory, TTFT of a 32-token and
of a 512-token prompt (each the second of two runs: the first autotunes the shape), decode
tok/s at batch 1, 16 concurrent streams (`llm bench`, 48 requests after 32 warm-up ones; C16=0
leaves it out), driver memory after unload, then a second load and unload in the same process
(CUDA already up, as torch's context is before the peer's timed load). One JSON object per
figure, tagged with the setting.
PROFILE=1 then starts one more server (the kernel cache warm, the last setting) with CubeCL's
profiler on and records where the second of two 512-token prompts, and a 32-token prompt with
its 7 decode steps at batch 1, spend device time (each CubeCL kernel timed; cuBLAS's GEMMs are not CubeCL kernels: the rest
of the wall time).
"""
import json, os, time

from full import (CKPT, HOST_PEAK_NOTE, Server, ensure_checkpoint, largest_shard_mb, log,
                  profile_slices, profile_summary, step_summary, toks, ttft)
from smoke import used_mb


def emit(metric, value, unit, **extra):
    print(json.dumps({"metric": metric, "model": "llama-3.1-8b-instruct", "value": value,
                      "unit": unit, **extra}), flush=True)


def main():
    ensure_checkpoint()
    kernels = "/tmp/llm-kernels"
    short = ",".join(str(1000 + i) for i in range(32))
    long_prompt = ",".join(str(1000 + (i * 37) % 120000) for i in range(512))
    var, values = os.environ.get("AB", "LLM_CUDA_GEMM=cublas,burn").split("=", 1)
    for value in values.split(","):
        setting = f"{var}={value}"
        base = used_mb()
        with Server(kernels, f"/tmp/server-{value}.log", {var: value}) as s:
            t = s.load("big", CKPT, "--quantization", "nf4")
            emit("load_s", round(t, 2), "s", setting=setting, phases_ms=s.phases(),
                 note="kernel cache shared by the settings: the first is a cold one")
            emit("device_mb_after_load", used_mb() - base, "MB", setting=setting)
            emit("host_peak_mb_load", s.host_peak_mb, "MB", setting=setting,
                 largest_shard_mb=largest_shard_mb(CKPT),
                 note=HOST_PEAK_NOTE + " (CUDA's start included)")
            for _ in range(2):
                g = s.generate("big", short)
            emit("ttft_ms_32", ttft(g), "ms", setting=setting)
            emit("decode_tok_s_b1", toks(g), "tok/s", setting=setting)
            for _ in range(2):
                g = s.generate("big", long_prompt, new=1)
            emit("ttft_ms_512", ttft(g), "ms", setting=setting)
            if os.environ.get("C16", "1") == "1":
                before = s.steps()
                b = s.llm("bench", "--model", "big", "--concurrency", "16", "--requests", "48",
                          "--max-new-tokens", "64", "--prompt-ids", short, "--ignore-eos",
                          "--warmup", "32", "--json")
                try:
                    j = json.loads(b.stdout)
                    emit("bench_tok_s_c16", j.get("tokens_per_second"), "tok/s",
                         setting=setting, report=j, steps=step_summary(before, s.steps()))
                except json.JSONDecodeError:
                    log("bench output not JSON", b.stdout[-400:], b.stderr[-400:])
            s.llm("unload", "big")
            time.sleep(1)
            pre = used_mb()
            emit("unload_residual_mb", pre - base, "MB", setting=setting)
            # Loaded again in the same process: CUDA and CubeCL are up, as torch's context is
            # before the peer's timed from_pretrained.
            t = s.load("big", CKPT, "--quantization", "nf4")
            emit("load_s_reload", round(t, 2), "s", setting=setting, phases_ms=s.phases(),
                 note="second load in the same server process (CUDA context up)")
            emit("host_peak_mb_reload", s.host_peak_mb, "MB", setting=setting,
                 largest_shard_mb=largest_shard_mb(CKPT), note=HOST_PEAK_NOTE)
            s.llm("unload", "big")
            time.sleep(1)
            emit("unload_residual_mb_vs_preload", used_mb() - pre, "MB", setting=setting,
                 note="after the second load/unload, minus the figure before it")
        log(f"{setting} done")
    if os.environ.get("PROFILE", "0") == "1":
        profile(kernels, short, long_prompt, {var: values.split(",")[-1]})


def profile(kernels, short, long_prompt, setting):
    """CubeCL's per-kernel device times of a 512-token prompt's step and of a 32-token prompt
    with 7 decode steps, under the last of the settings."""
    prof = "/tmp/cubecl-profile-ab.log"
    env = {"CUBECL_DEBUG_OPTION": "profile", "CUBECL_DEBUG_LOG": prof, **setting}
    size = lambda: os.path.getsize(prof) if os.path.exists(prof) else 0
    marks = {}
    with Server(kernels, "/tmp/server-profile.log", env) as s:
        s.load("big", CKPT, "--quantization", "nf4")
        s.generate("big", long_prompt, new=1)
        time.sleep(1)
        marks["ttft512"] = size()
        g = s.generate("big", long_prompt, new=1)
        emit("ttft_ms_512_profiled", ttft(g), "ms", setting=setting,
             note="CubeCL's profiler on: kernels timed one by one")
        time.sleep(1)
        marks["b1"] = size()
        s.generate("big", short, new=8)
        time.sleep(1)
        marks["end"] = size()
    for name, path in profile_slices(prof, marks):
        every = profile_summary(path, top=None)
        emit(f"profile_{name}_kernels", profile_summary(path), "-", setting=setting,
             total_us=round(sum(v["total_us"] for v in every.values()), 1))


if __name__ == "__main__":
    main()
