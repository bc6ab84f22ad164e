#!/usr/bin/env python3
"""GPU smoke run of the real server binary and plugins (bench/gpu.sh smoke).

Starts llm-server from .gpu/ with --device cuda, loads two architectures at once (tiny Llama
and tiny Qwen2, the bitsandbytes NF4 fixtures), generates each fixture's greedy ids with the
`llm` CLI from `--prompt-ids`, interleaving the two models, then unloads both. Prints one JSON
object per figure: leading greedy tokens equal to HF's f32 NF4 reference (bf16 compute may
diverge late on a random tiny model), and the driver's used memory before load, after load
and after unload.
"""
import json, os, signal, socket, subprocess, sys, time
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, ".gpu")
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny")


def used_mb():
    out = subprocess.check_output(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], text=True)
    return float(out.split()[0])


def emit(metric, model, value, unit, **extra):
    print(json.dumps({"metric": metric, "model": model, "value": value, "unit": unit, **extra}),
          flush=True)


def stop_servers_on_sigterm():
    """Turn the SIGTERM of gpu.sh's `timeout` into SystemExit, so that the `finally` blocks and
    context managers that stop the servers run: by default SIGTERM ends Python at once, and a
    timed-out run left its llm-server holding the GPU into the next step of the call."""
    def stop(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")
    signal.signal(signal.SIGTERM, stop)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    stop_servers_on_sigterm()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    llm = lambda *a: subprocess.run([os.path.join(GPU, "llm"), "--server", url, *a],
                                    capture_output=True, text=True, timeout=300)
    server = subprocess.Popen([os.path.join(GPU, "llm-server"), "--listen", f"127.0.0.1:{port}",
                               "--plugin-dir", GPU, "--device", "cuda"],
                              stdout=sys.stderr, stderr=sys.stderr)
    try:
        for _ in range(200):
            if llm("models").returncode == 0:
                break
            time.sleep(0.1)
        base = used_mb()
        archs = ["llama", "qwen2"]
        for arch in archs:
            t0 = time.time()
            r = llm("load", f"tiny-{arch}", os.path.join(TINY, arch, "nf4"))
            assert r.returncode == 0, r.stderr
            emit("load_s", f"tiny-{arch}-nf4", time.time() - t0, "s", device="cuda")
        print(llm("models").stdout, file=sys.stderr)
        loaded = used_mb()
        refs = {a: load_file(os.path.join(TINY, a, "reference.safetensors")) for a in archs}
        # Interleave the two models (two plugins, one GPU, one process).
        for round_ in range(2):
            for arch in archs:
                ids = refs[arch]["input_ids"].reshape(-1).tolist()
                want = refs[arch]["greedy_nf4_f32"].reshape(-1).tolist()
                r = llm("generate", "--model", f"tiny-{arch}", "--prompt-ids",
                        ",".join(map(str, ids)), "--ids", "--ignore-eos",
                        "--max-new-tokens", str(len(want)))
                assert r.returncode == 0, r.stderr
                got = [int(t) for t in r.stdout.split()]
                lead = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), len(want))
                emit("greedy_leading_match", f"tiny-{arch}-nf4", lead, "tokens",
                     of=len(want), round=round_, got=got, want=want, device="cuda")
        for arch in archs:
            r = llm("unload", f"tiny-{arch}")
            assert r.returncode == 0, r.stderr
        time.sleep(1)
        after = used_mb()
        emit("device_mb_after_load", "tiny-llama+tiny-qwen2", loaded - base, "MB",
             note="driver used memory minus before-load (includes CUDA context)")
        emit("unload_residual_mb", "tiny-llama+tiny-qwen2", after - base, "MB")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
