#!/usr/bin/env python3
"""One line per figure of llm-bench / gpu.sh JSON-lines files, for reading a device call's
output at a glance: `python3 bench/summary.py OUT/*.jsonl`."""
import json
import sys


def line(o):
    m = o.get("metric")
    if m == "nf4_linear":
        return (f"{o['model']:>11} b{o['batch']:<3} {o['path']:<15} {o['value']:8.1f} us  "
                f"rel {o['rel_err']:.1e} {'ok' if o['pass'] else 'FAIL'}")
    if m == "cuda_vs_cpu_rel_err":
        keys = ("prefill_32", "prefill_80", "decode_16", "batch_16x4",
                "mixed_15_decode_1_prompt")
        errs = " ".join(f"{k}={o[k]:.2e}" for k in keys if k in o)
        pool = "pool" if o.get("kv_pool") else "no pool"
        return f"{o.get('model')} {pool}: {errs} {'ok' if o.get('pass') else 'FAIL'}"
    extra = {k: o[k] for k in ("setting", "steps", "pass") if k in o}
    return f"{m} {o.get('model', '')} {o.get('value')} {o.get('unit', '')} {extra or ''}"


for path in sys.argv[1:]:
    for text in open(path, errors="replace"):
        if text.startswith("{"):
            try:
                print(line(json.loads(text)))
            except (KeyError, TypeError, ValueError) as e:
                print(f"unreadable line ({e}): {text[:200]}")
