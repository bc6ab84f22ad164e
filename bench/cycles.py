#!/usr/bin/env python3
"""Load/unload cycles on the GPU (bench/gpu.sh cycles): does a server process give the device
memory back, every time?

One `llm-server --device cuda` process. The driver's used-memory figure (nvidia-smi) before the
server starts, then after each cycle of load / generate / unload: TINY_CYCLES (default 20) of
the tiny Llama (NF4, 8 tokens each), then, while the run has time, the Llama-3.1-8B-shape
checkpoint (random bf16, quantized to NF4 on load).

The baseline is the server process with its device initialised: the figure after the first
tiny cycle, whose load creates what a GPU process holds for its lifetime (the CUDA context and
the compiled kernels, with the local-memory reservation their launches grew). Every later cycle
is compared with it. For scale, the same run measures a bare CUDA context (a process that only
retains the device's primary context, through the driver API) against the pre-start figure.
Prints one JSON object per figure.
"""
import json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full import CKPT, MODEL, ROOT, Server, ensure_checkpoint, log  # same directory
from smoke import stop_servers_on_sigterm, used_mb

START = time.time()
BUDGET = float(os.environ.get("FULL_TIMEOUT", "480"))


def emit(metric, model, value, unit, **extra):
    print(json.dumps({"metric": metric, "model": model, "value": value, "unit": unit, **extra}),
          flush=True)


BARE_CONTEXT = r"""
import ctypes, subprocess, sys
cuda = ctypes.CDLL("libcuda.so.1")
dev, ctx = ctypes.c_int(), ctypes.c_void_p()
assert cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
assert cuda.cuCtxSetCurrent(ctx) == 0
free, total = ctypes.c_size_t(), ctypes.c_size_t()
assert cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
print(subprocess.check_output(["nvidia-smi", "--query-gpu=memory.used",
                               "--format=csv,noheader,nounits"], text=True).split()[0])
"""


def bare_context_mb(base):
    """Driver used memory while a process holds just the primary CUDA context, minus `base`."""
    import subprocess
    out = subprocess.check_output([sys.executable, "-c", BARE_CONTEXT], text=True)
    return float(out.split()[-1]) - base


def main():
    stop_servers_on_sigterm()
    base = used_mb()
    bare = bare_context_mb(base)
    log(f"bare CUDA context: {bare} MB over the pre-start figure")
    emit("bare_cuda_context_mb", "-", bare, "MB",
         note="driver used memory while a process holds only the primary CUDA context")
    tiny = os.path.join(ROOT, "tests/fixtures/tiny/llama/nf4")
    with Server("/tmp/llm-kernels", "/tmp/server-cycles.log") as s:
        # The server retains the CUDA context at start (server/src/cuda.rs): this figure holds
        # it before any load.
        up = used_mb() - base
        log(f"server up, no model: {up} MB over the pre-start figure")
        emit("device_mb_server_up", "-", up, "MB",
             note="driver used memory with the server up and no model, minus the pre-start figure")
        after, loads = [], []
        for i in range(int(os.environ.get("TINY_CYCLES", "20"))):
            loads.append(round(s.cycle("t", tiny), 2))
            after.append(used_mb() - base)
            log(f"tiny cycle {i}: load {loads[-1]} s, {after[-1]} MB over the pre-start figure")
        emit("tiny_cycles_mb_over_first_unload", "tiny-llama-nf4", after[-1] - after[0], "MB",
             max_mb_over_first_unload=max(a - after[0] for a in after),
             cycles_mb_over_prestart=after, load_s=loads, bare_context_mb=bare,
             note="driver used memory after each load/generate/unload of the tiny Llama")
        if time.time() - START > BUDGET - 200:
            return
        ensure_checkpoint()
        big, loads = [], []
        while time.time() - START < BUDGET - 60:
            loads.append(round(s.cycle("big", CKPT, "--quantization", "nf4"), 2))
            big.append(used_mb() - base)
            log(f"8B cycle {len(big)}: load {loads[-1]} s, {big[-1]} MB over the pre-start figure")
        if big:
            emit("big_cycles_mb_over_first_unload", MODEL, big[-1] - after[0], "MB",
                 max_mb_over_first_unload=max(b - after[0] for b in big),
                 cycles_mb_over_prestart=big, load_s=loads, bare_context_mb=bare,
                 note="driver used memory after each 8B load/generate/unload, same process")


if __name__ == "__main__":
    main()
