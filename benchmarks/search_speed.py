"""Plan-search throughput, and what reusing the shared prefix (the layers before S) saves.

    snakemake --cores all                       # first: builds resources/default/<model>/corpus.pt
    python benchmarks/search_speed.py [--repeats 3] [--every 4]

Scores the config's plan grid on the search blocks twice per round, with the prefix reused (each
batch runs the original once and every plan only from its start layer) and from scratch (every plan
runs the whole model), in alternating order; reports the median plans per minute of each and the
median per-round speed-up. Writes results/benchmarks/search_speed.{json,png}.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import yaml

from cqil.data import load_split
from cqil.models import load_model
from cqil.search import SearchSettings, score_plans

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--config", default="config/config.yaml")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--every", type=int, default=1, help="score every n-th plan of the grid (a faster sample)")
parser.add_argument("--out", default="results/benchmarks")
args = parser.parse_args()

config = yaml.safe_load(Path(args.config).read_text())
name = config["models"][0]
model_config = config["catalog"][name]
corpus = Path("resources") / config["run"] / name / "corpus.pt"
if not corpus.exists():
    raise SystemExit(f"{corpus} not found: run `snakemake --cores all` first")
blocks = load_split(corpus, config["search"].get("split", "search"))  # int64 ids: the file stores compact ones
settings = SearchSettings(**{k: v for k, v in config["search"].items() if k != "split"})
plans = settings.plans(model_config["layers"])[:: args.every]
model, _ = load_model(model_config["spec"], dtype=model_config.get("dtype", "auto"))

times = {"prefix reused": [], "from scratch": []}
for round_ in range(args.repeats):
    order = list(times) if round_ % 2 == 0 else list(times)[::-1]
    for way in order:
        start = time.perf_counter()
        score_plans(
            model, blocks, plans, batch_size=settings.batch_size, reuse_prefix=way == "prefix reused", progress=False
        )
        times[way].append(time.perf_counter() - start)
        print(f"round {round_ + 1}/{args.repeats}: {way}: {times[way][-1]:.1f} s for {len(plans)} plans")

per_minute = {way: 60 * len(plans) / statistics.median(t) for way, t in times.items()}
speedup = statistics.median(s / r for s, r in zip(times["from scratch"], times["prefix reused"]))
record = {
    "model": name,
    "plans": len(plans),
    "blocks": list(blocks.shape),
    "threads": torch.get_num_threads(),
    "repeats": args.repeats,
    "seconds": times,
    "plans_per_minute": per_minute,
    "speedup": speedup,
}
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / "search_speed.json").write_text(json.dumps(record, indent=2) + "\n")

fig, ax = plt.subplots(figsize=(5, 2.6))
ax.barh(list(per_minute), list(per_minute.values()), color=["tab:green", "tab:gray"])
for i, value in enumerate(per_minute.values()):
    ax.text(value, i, f" {value:.1f}", va="center")
ax.set_xlabel(f"plans scored per minute ({blocks.shape[0]}x{blocks.shape[1]} tokens each)")
ax.set_title(f"{name}: plan search, prefix reuse x{speedup:.2f} ({torch.get_num_threads()} threads)", fontsize=9)
ax.set_xlim(0, max(per_minute.values()) * 1.25)
fig.tight_layout()
fig.savefig(out / "search_speed.png", dpi=150)
print(json.dumps({"plans_per_minute": per_minute, "speedup": speedup}, indent=2))
