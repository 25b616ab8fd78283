"""Overhead of the in-process CQIL transform: forward time of the planned model vs the original.

    python benchmarks/transform_overhead.py [--model smollm2-135m] [--repeats 7]

A simulated CQIL model does the same arithmetic as the original (every layer once), so its forward
should cost the same; what it adds is bookkeeping (the group loop, the summed deltas). Variants are
timed in interleaved rounds after a warm-up, and each round's ratio to the original is taken within
that round, so machine drift cancels. Writes results/benchmarks/transform_overhead.{json,png}.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from cqil import Plan, apply_plan, load_model

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--plans", nargs="+", default=["S18-E28-P2-D0", "S12-E28-P4-D1"])
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--tokens", type=int, default=512)
parser.add_argument("--repeats", type=int, default=7)
parser.add_argument("--out", default="results/benchmarks")
args = parser.parse_args()

model, _ = load_model(args.model)
ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
variants = [None] + [Plan.parse(p) for p in args.plans]
names = ["original"] + args.plans
times = {name: [] for name in names}

with torch.inference_mode():
    for round_ in range(args.repeats + 1):  # round 0 is the warm-up
        for name, plan in zip(names, variants):
            apply_plan(model, plan)
            start = time.perf_counter()
            model(input_ids=ids)
            if round_:
                times[name].append(time.perf_counter() - start)
        if round_:
            print(f"round {round_}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))

ratios = {n: statistics.median(t / o for t, o in zip(times[n], times["original"])) for n in args.plans}
record = {
    "model": args.model,
    "input": [args.batch, args.tokens],
    "repeats": args.repeats,
    "threads": torch.get_num_threads(),
    "torch": torch.__version__,
    "cpu": platform.processor() or platform.machine(),
    "cores": os.cpu_count(),
    "median_s": {n: statistics.median(t) for n, t in times.items()},
    "median_ratio_to_original": ratios,
    "times_s": times,
}
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / "transform_overhead.json").write_text(json.dumps(record, indent=2) + "\n")

fig, ax = plt.subplots(figsize=(5, 3))
ax.boxplot([times[n] for n in names], tick_labels=names)
ax.set_ylabel(f"forward time, {args.batch}x{args.tokens} tokens (s)")
ax.set_title(f"{args.model}: simulated CQIL vs original ({torch.get_num_threads()} threads)", fontsize=9)
for i, n in enumerate(args.plans, start=2):
    ax.annotate(
        f"x{ratios[n]:.3f}", (i, statistics.median(times[n])), textcoords="offset points", xytext=(14, 0), fontsize=8
    )
fig.tight_layout()
fig.savefig(out / "transform_overhead.png", dpi=150)
print(json.dumps({"median_s": record["median_s"], "median_ratio_to_original": ratios}, indent=2))
