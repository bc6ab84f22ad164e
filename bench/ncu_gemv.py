#!/usr/bin/env python3
"""Summarise `ncu --csv` output of `llm-bench gemv` (bench/gpu.sh gemv): per shape, the median
duration of its 20 GEMV launches (per launch configuration, when `GEMV_CONFIGS` asks for
several), DRAM bytes read, and the weight-read bandwidth as a fraction
of the copy bandwidth `llm-bench` measured in the same process. One JSON object per shape.

The CSV has one row per (launch, metric); `llm-bench gemv` prints its JSON lines (copy
bandwidth, one line per shape, in launch order) to stdout before ncu's table.
"""
import csv, io, json, statistics, sys

text = open(sys.argv[1]).read()
lines = text.splitlines()
marks = [json.loads(l) for l in lines if l.startswith("{")]
copy = next(m["value"] for m in marks if m["metric"] == "copy_bandwidth")
shapes = [m for m in marks if m["metric"] == "gemv_for_ncu"]
table = "\n".join(l for l in lines if l.startswith('"'))
launches = {}
for row in csv.DictReader(io.StringIO(table)):
    if "nf4_gemv" not in row.get("Kernel Name", ""):
        continue
    value = float(row["Metric Value"].replace(",", ""))
    unit = row.get("Metric Unit", "")
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3,
             "msecond": 1e3, "B": 1, "byte": 1, "KB": 1e3, "Kbyte": 1e3, "MB": 1e6,
             "Mbyte": 1e6, "GB": 1e9, "Gbyte": 1e9}[unit]
    launches.setdefault(int(row["ID"]), {})[row["Metric Name"]] = value * scale
ids = sorted(launches)
at = 0
for shape in shapes:
    # A group's launches: `skip` checking ones (not timed), then 20 timed.
    at += shape.get("skip", 0)
    mine = [launches[j] for j in ids[at:at + 20]]
    at += 20
    us = statistics.median(l["gpu__time_duration.sum"] for l in mine)
    read = statistics.median(l["dram__bytes_read.sum"] for l in mine)
    gbs = shape["weight_bytes"] / (us * 1e-6) / 1e9
    print(json.dumps({"metric": "nf4_gemv_ncu", "model": shape["model"], "value": us,
                      "unit": "us", "batch": 1, "dram_read_MB": read / 1e6,
                      "weight_GBps": gbs, "copy_GBps": copy, "fraction_of_copy": gbs / copy,
                      "launches": len(mine), "timing": "ncu gpu__time_duration, clocks not locked",
                      **{k: shape[k] for k in ("kernel", "rows", "planes", "unroll", "default", "rel_err",
                                               "pass") if k in shape}}))
