#!/usr/bin/env python3
"""Full-size GPU run (bench/gpu.sh full): Llama-3.1-8B-Instruct shape, NF4 double quant, bf16
compute, through the real server binary and plugin, against HF transformers + bitsandbytes (the
seed's recipe, bench/peer/bench_hf.py) in the same call.

1. A random bf16 checkpoint with the hub's exact layout (bench/peer/make_random_checkpoint.py).
2. The peer: from_pretrained with the bnb config, 512-token prefill, decode at batch 1 and 16.
3. Ours: llm-server --device cuda with an empty kernel cache, `llm load` (quantize on load,
   timed, with the server's load phases and its peak host memory against the largest shard),
   driver memory before / after load / after unload,
   DescribeModel's device memory, greedy decode at batch 1 (`llm generate --stats`: TTFT and
   decode tok/s), TTFT of a 512-token prompt, 1 and 16 concurrent streams (`llm bench --json`).
4. A second server process with the kernel cache the first one filled: load time, the first
   request's decode speed; then CYCLES (default 3) more 8B load/generate/unload cycles, each
   against the driver's figure before them (this process's CUDA context, no model).
SERVING=0 leaves out the 512-token TTFT and the 16 streams (minutes of first-use autotuning).

Prints one JSON object per figure ({"metric", "model", "value", "unit", "peer", "peer_value"}).
"""
import json, os, re, socket, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, ".gpu")
from smoke import free_port, stop_servers_on_sigterm, used_mb  # same directory

CKPT = "/tmp/ckpt-llama-3.1-8b"
MODEL = "llama-3.1-8b-instruct"
NEW = 128
START = time.time()
# Seconds the run may take (gpu.sh's timeout): optional parts are skipped near the end.
BUDGET = float(os.environ.get("FULL_TIMEOUT", "520"))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def emit(metric, value, unit, peer=None, peer_value=None, **extra):
    print(json.dumps({"metric": metric, "model": MODEL, "value": value, "unit": unit,
                      "peer": peer, "peer_value": peer_value, **extra}), flush=True)


def ensure_checkpoint():
    """The random 8B checkpoint in the hub's layout, made once per machine."""
    if not os.path.exists(os.path.join(CKPT, "model.safetensors.index.json")):
        t = time.time()
        subprocess.run([sys.executable, os.path.join(ROOT, "bench/peer/make_random_checkpoint.py"),
                        os.path.join(ROOT, "tests/fixtures/configs", MODEL), CKPT], check=True,
                       stdout=sys.stderr)
        log(f"checkpoint in {time.time() - t:.0f} s")


def main():
    stop_servers_on_sigterm()
    ensure_checkpoint()
    peer = {}
    if os.environ.get("SKIP_PEER") != "1":
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench/peer/bench_hf.py"), CKPT,
                            "/tmp/peer.json", "--batches", os.environ.get("PEER_BATCHES", "1,16"),
                            "--new", "64"],
                           stdout=sys.stderr, stderr=sys.stderr, timeout=300)
        if r.returncode == 0:
            peer = json.load(open("/tmp/peer.json"))
        log("peer:", peer)
    hf = "hf-transformers+bnb"

    # Compiled kernels and autotune results persist here across server processes
    # (`--kernel-cache`); empty at the start of the run, so the first load is a cold one.
    kernels = "/tmp/llm-kernels"
    if os.environ.get("KEEP_KERNELS") != "1":  # 1: reuse what an earlier run on this machine left
        subprocess.run(["rm", "-rf", kernels])
    base = used_mb()
    prompt = ",".join(str(1000 + i) for i in range(32))
    with Server(kernels, "/tmp/server1.log") as s:
        # The server is up: its CUDA context exists (retained at start), no model is loaded.
        preload = used_mb()
        emit("device_mb_server_up", preload - base, "MB",
             note="driver used memory with the server up and no model (its CUDA context), "
                  "minus the pre-start baseline")
        load_s = s.load("big", CKPT, "--quantization", "nf4")
        emit("load_s", round(load_s, 2), "s", hf, peer.get("load_s"),
             note="first load on the machine: empty kernel cache", phases_ms=s.phases())
        emit("device_mb_after_load", used_mb() - base, "MB", hf, peer.get("footprint_MB"),
             note="driver used memory minus the pre-start baseline; peer: get_memory_footprint")
        emit("host_peak_mb_load", s.host_peak_mb, "MB", largest_shard_mb=largest_shard_mb(CKPT),
             note=HOST_PEAK_NOTE + " (CUDA's start and compiles included)")
        d = s.llm("describe", "big")
        log(d.stdout[-600:])
        measure(s, peer, hf)
        s.llm("unload", "big")
        time.sleep(1)
        after = used_mb()
        emit("unload_residual_mb", after - base, "MB",
             note="driver used memory after unload minus the pre-start baseline (CUDA context included)")
        emit("unload_residual_mb_vs_preload", after - preload, "MB",
             note="the process's first load (cold kernel cache): driver used memory after its "
                  "unload minus the figure with the server up before it")
    # A new process on the same machine: the kernel cache is warm.
    log(f"{time.time() - START:.0f} s into the run")
    if os.environ.get("SECOND", "1") != "1":
        return
    with Server(kernels, "/tmp/server2.log") as s:
        t = s.load("big", CKPT, "--quantization", "nf4")
        emit("load_s_cached_kernels", round(t, 2), "s", hf, peer.get("load_s"),
             note="a new server process, kernel cache filled by the first", phases_ms=s.phases())
        emit("host_peak_mb_load_cached_kernels", s.host_peak_mb, "MB",
             largest_shard_mb=largest_shard_mb(CKPT),
             note=HOST_PEAK_NOTE + " (a second process: no compiles)")
        t = time.time()
        g = s.generate("big", prompt)
        emit("first_request_s_cached_kernels", round(time.time() - t, 2), "s",
             note=f"{NEW} tokens, the first request of the new process")
        emit("decode_tok_s_b1_cached_kernels", toks(g), "tok/s", hf, peer.get("decode_tok_s_b1"))
        s.llm("unload", "big")
        time.sleep(1)
        # The pre-load value of every further load: this process's CUDA context and CubeCL
        # state exist, no model is loaded. Each load/generate/unload cycle must come back to it.
        pre = used_mb()
        log(f"after the first unload: {pre - base} MB over the pre-start baseline")
        after = []
        for i in range(int(os.environ.get("CYCLES", "3"))):
            if time.time() - START > BUDGET - 70:
                break
            t = s.cycle("big", CKPT, "--quantization", "nf4")
            after.append(used_mb() - pre)
            log(f"cycle {i}: load {t:.1f} s, {after[-1]} MB over the pre-load value")
        if after:
            emit("unload_residual_mb_vs_preload", after[-1], "MB", cycles=after,
                 note="driver used memory after each further 8B load/generate/unload, minus the value before those loads")
    # More new processes, each timing its first load (kernel cache filled): the figure a
    # restarted server shows, which varies more than loads inside one process.
    for i in range(int(os.environ.get("NEW_PROCESSES", "0"))):
        if time.time() - START > BUDGET - 60:
            break
        with Server(kernels, f"/tmp/server-new{i}.log") as s:
            t = s.load("big", CKPT, "--quantization", "nf4")
            emit("load_s_new_process", round(t, 2), "s", hf, peer.get("load_s"), process=i + 3,
                 note="another new server process's first load, kernel cache filled",
                 phases_ms=s.phases())
            s.llm("unload", "big")
    # Where a decode step's time goes: CubeCL's profile (each kernel timed) of 8 tokens at
    # batch 1, for the next change to aim at. Only if the run has time left.
    if time.time() - START < BUDGET - 100:
        prof = "/tmp/cubecl-profile.log"
        env = {"CUBECL_DEBUG_OPTION": "profile", "CUBECL_DEBUG_LOG": prof}
        size = lambda: os.path.getsize(prof) if os.path.exists(prof) else 0
        with Server(kernels, "/tmp/server3.log", env) as s:
            s.load("big", CKPT, "--quantization", "nf4")
            time.sleep(1)
            mark = size()  # after the warm-up
            s.generate("big", prompt, new=8)
            # 16 streams of 8 tokens: the batched step's kernels.
            mark16 = size()
            s.llm("bench", "--model", "big", "--concurrency", "16", "--requests", "16",
                  "--max-new-tokens", "8", "--prompt-ids", prompt, "--ignore-eos", "--json")
        for name, path in profile_slices(prof, {"b1": mark, "c16": mark16, "end": size()}):
            emit(f"profile_{name}_kernels", profile_summary(path), "-")


def profile_slices(prof, marks):
    """Cut CubeCL's profile log `prof` at `marks` ({name: byte offset}, in order, the last one
    the end): each slice to /tmp/profile-NAME.log, and xz-compressed to $OUT. Yields (name, path)."""
    out = os.environ.get("OUT", "/tmp")
    names = list(marks)
    for a, b in zip(names, names[1:]):
        path = f"/tmp/profile-{a}.log"
        with open(prof, "rb") as f:
            f.seek(marks[a])
            open(path, "wb").write(f.read(marks[b] - marks[a]))
        subprocess.run(f"xz -T0 -c {path} > {out}/profile-{a}.log.xz", shell=True)
        yield a, path


def profile_summary(path, top=12):
    """Kernel name -> (launches, total us) of a CubeCL profile log, the `top` largest totals
    (all with `top=None`)."""
    per = {}
    for line in open(path, errors="replace"):
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 3 or not parts[1]:
            continue
        m = re.match(r"([0-9.]+)(µs|ms|ns|s)$", parts[1])
        if not m:
            continue
        us = float(m.group(1)) * {"µs": 1, "ms": 1e3, "ns": 1e-3, "s": 1e6}[m.group(2)]
        c = per.setdefault(parts[2], [0, 0.0])
        c[0] += 1
        c[1] += us
    largest = sorted(per.items(), key=lambda kv: -kv[1][1])[:top]
    return {k: {"launches": n, "total_us": round(t, 1)} for k, (n, t) in largest}
# `--stats`: "[length] prompt P tokens, generated N tokens, TTFT X ms, Y tok/s, seed S"
def ttft(text):
    return float(re.search(r"TTFT ([0-9.]+) ms", text).group(1))


HOST_PEAK_NOTE = ("server VmHWM during the load minus VmRSS before it; target: under 2x the "
                  "largest shard")


def proc_kb(status, field):
    """A `/proc/PID/status` figure in kB."""
    for line in open(status):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def largest_shard_mb(ckpt):
    return round(max(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt)
                     if f.endswith(".safetensors")) / 2**20)


def toks(text):
    return float(re.search(r"([0-9.]+) tok/s", text).group(1))


class Server:
    """llm-server on CUDA, its log in a file; `llm` against it."""

    def __init__(self, kernels, log_path, env=None):
        self.port = free_port()
        self.metrics_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [os.path.join(GPU, "llm-server"), "--listen", f"127.0.0.1:{self.port}",
             "--plugin-dir", GPU, "--device", "cuda", "--max-batch", "16", "--max-context",
             "4096", "--kernel-cache", kernels,
             "--metrics-listen", f"127.0.0.1:{self.metrics_port}"], stdout=self.log, stderr=self.log,
            env={**os.environ, **(env or {})})

    def __enter__(self):
        for _ in range(200):
            if self.llm("models").returncode == 0:
                break
            time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
        log(open(self.log_path).read()[-3000:])

    def llm(self, *a, timeout=400):
        return subprocess.run([os.path.join(GPU, "llm"), "--server", self.url, *a],
                              capture_output=True, text=True, timeout=timeout)

    def load(self, name, source, *extra):
        # Peak host memory of the load: VmHWM after it (reset to VmRSS by clear_refs "5") minus
        # VmRSS before it; mapped checkpoint pages count. The bound: 2x the largest shard.
        # The server sets CUDA up at start (server/src/cuda.rs); a process's first load still
        # maps CubeCL's and cuBLAS's pages and NVRTC's compiles (see
        # host_peak_mb_load_cached_kernels).
        status = f"/proc/{self.proc.pid}/status"
        try:
            with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
                f.write("5")
            before = proc_kb(status, "VmRSS")
        except OSError as e:
            log("no peak host memory:", e)
            before = None
        t = time.time()
        r = self.llm("load", name, source, "--device", "cuda", *extra)
        took = time.time() - t
        self.host_peak_mb = (None if before is None
                             else round((proc_kb(status, "VmHWM") - before) / 1024))
        log(r.stdout[-300:], r.stderr[-300:])
        if r.returncode != 0:
            raise SystemExit(f"load of {source} failed")
        return took

    def steps(self):
        """The scheduler's steps so far by kind (decode, prefill, mixed), from /metrics:
        {kind: (steps, seconds, rows)}."""
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=10).read().decode()
        out = {}
        for kind in ("decode", "prefill", "mixed"):
            get = lambda name: float((re.findall(
                r'%s\{model="[^"]*",kind="%s"\} ([0-9.e+-]+)' % (name, kind), text) or ["0"])[0])
            out[kind] = (get("llm_step_duration_seconds_count"),
                         get("llm_step_duration_seconds_sum"), get("llm_step_rows_total"))
        return out

    def phases(self):
        """The last load's phases as the server logged them (`plugin load phases (ms)`)."""
        text = open(self.log_path).read()
        if "plugin load phases" not in text:
            return None
        last = text[max(0, text.rindex("plugin load phases") - 400):]
        get = lambda key: (re.findall(r'"%s":(\d+)' % key, last) or [None])[-1]
        keys = ("prepare", "weights", "upload_wait", "warm_up", "quantize", "nf4_upload", "float_tensors")
        return {k: int(get(k)) for k in keys if get(k) is not None}

    def cycle(self, name, source, *extra):
        """Load, generate 8 tokens (EOS ignored), unload: the load's seconds."""
        t = self.load(name, source, *extra)
        self.llm("generate", "--model", name, "--prompt-ids", "1,2,3", "--max-new-tokens", "8",
                 "--ignore-eos", "--ids")
        self.llm("unload", name)
        time.sleep(1)
        return t

    def generate(self, model, prompt_ids, new=NEW):
        g = self.llm("generate", "--model", model, "--prompt-ids", prompt_ids,
                     "--max-new-tokens", str(new), "--ignore-eos", "--ids", "--stats")
        log(g.stderr[-400:])
        return g.stderr


def step_summary(before, after):
    """Steps between two `Server.steps()` readings, by kind: count, mean ms, rows per step."""
    out = {}
    for kind, (n1, s1, r1) in after.items():
        n0, s0, r0 = before.get(kind, (0, 0, 0))
        if n1 > n0:
            out[kind] = {"steps": int(n1 - n0), "mean_ms": round((s1 - s0) / (n1 - n0) * 1e3, 2),
                         "total_s": round(s1 - s0, 3),
                         "rows_per_step": round((r1 - r0) / (n1 - n0), 1)}
    return out


def measure(s, peer, hf):
    """Batch-1 decode, TTFT at 32 and 512 tokens, 1 and 16 concurrent streams."""
    prompt = ",".join(str(1000 + i) for i in range(32))
    for i in range(2):  # the load warmed the kernels up: the first run should be as fast
        t = time.time()
        g = s.generate("big", prompt)
        if i == 0:
            emit("first_request_s", round(time.time() - t, 2), "s",
                 note=f"{NEW} tokens, the first request after the load")
    emit("decode_tok_s_b1", toks(g), "tok/s", hf, peer.get("decode_tok_s_b1"))
    emit("ttft_ms_32", ttft(g), "ms")
    serving = os.environ.get("SERVING", "1") == "1"
    if not serving:  # the 512-token prefill and 16 streams autotune new shapes: minutes
        b = s.llm("bench", "--model", "big", "--concurrency", "1", "--requests", "2",
                  "--max-new-tokens", "64", "--prompt-ids", prompt, "--ignore-eos",
                  "--warmup", "1", "--json")
        emit("bench_tok_s_c1", json.loads(b.stdout).get("tokens_per_second"), "tok/s", hf,
             peer.get("decode_tok_s_b1"))
        return
    for c in (1, 16):
        before = s.steps()
        b = s.llm("bench", "--model", "big", "--concurrency", str(c), "--requests", str(c * 2),
                  "--max-new-tokens", "64", "--prompt-ids", prompt, "--ignore-eos",
                  "--warmup", str(c), "--json")
        log(b.stdout[-800:], b.stderr[-400:])
        try:
            j = json.loads(b.stdout)
            emit(f"bench_tok_s_c{c}", j.get("tokens_per_second"), "tok/s", hf,
                 peer.get(f"decode_tok_s_b{c}"), report=j, steps=step_summary(before, s.steps()))
        except json.JSONDecodeError:
            log("bench output not JSON")
    long_prompt = ",".join(str(1000 + (i * 37) % 120000) for i in range(512))
    for i in range(2):
        g = s.generate("big", long_prompt, new=1)
    emit("ttft_ms_512", ttft(g), "ms", "hf prefill_512_ms", peer.get("prefill_512_ms"))


if __name__ == "__main__":
    main()
