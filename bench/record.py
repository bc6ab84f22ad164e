#!/usr/bin/env python3
"""Append one bench/gpu.sh run to docs/benchmarks.jsonl, one JSON object per figure.

    bench/record.py OUT_DIR COMMIT [DATE]

OUT_DIR holds what bench/gpu.sh wrote (gpu.txt and one .jsonl per mode: bench-MODE.jsonl,
fused.jsonl, gemv.jsonl, smoke.jsonl, full.jsonl, models.jsonl, cycles.jsonl); every .jsonl
there is read. Each object gets
{"date", "commit", "card", "model", "metric", "value", "unit"}, plus "peer"/"peer_value" where
the run measured a peer for the same figure, and the figure's own details.
"""
import datetime, glob, json, os, sys

out_dir, commit = sys.argv[1], sys.argv[2]
date = sys.argv[3] if len(sys.argv) > 3 else datetime.date.today().isoformat()
card = open(os.path.join(out_dir, "gpu.txt")).read().split(",")[0].strip()
rows = []
for path in sorted(glob.glob(os.path.join(out_dir, "*.jsonl"))):
    rows += [json.loads(l) for l in open(path) if l.startswith("{")]
# The peer of an NF4 linear timing is Burn's dense bf16 matmul of the same shape and batch.
peers = {(r["model"], r.get("batch")): r["value"] for r in rows if r["metric"] == "bf16_matmul"}
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(root, "docs", "benchmarks.jsonl"), "a") as f:
    for r in rows:
        o = {"date": date, "commit": commit, "card": card, **r}
        if r["metric"] == "nf4_linear" and (r["model"], r.get("batch")) in peers:
            o["peer"] = "burn bf16 matmul"
            o["peer_value"] = peers[(r["model"], r.get("batch"))]
        f.write(json.dumps(o) + "\n")
print(f"recorded {len(rows)} figures")
