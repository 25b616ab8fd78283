"""One record per run, from the run's artifacts, in an append-only history (JSON lines).

A record holds where it came from (git sha and dirty flag, date, machine, config name and hash, the
version of every installed package) and the run's key metrics, flattened to `name -> value`: per-plan
perplexity, KL and top-1 agreement, task accuracies, measured latencies and reductions, search throughput
and each stage's wall time (Snakemake's benchmark files). Beside the values it keeps what they rest on:
every timed repeat of a latency (`samples`), the bootstrap interval of a quality number (`intervals`), and
which latencies were measured on a busy machine (`contended`, cqil/latency/contention.py). The history is
only ever appended to; a corrupt line is reported and skipped, never fatal.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import git_sha, machine, settings_hash
from ..latency.table import table, withheld
from .environment import installed
from .settings import DEFAULT_RULES
from .verdict import Measurement


def latency_measurements(model: str, results: list[dict]) -> tuple[dict[str, Measurement], set[str]]:
    """Each latency's median and repeats (`.../ms`), its reduction against the 1-thread original and, where each
    repeat was timed beside one of the original (interleaved), their `ratio` with a sample per repeat: a
    same-run ratio, in which the machine's drift between runs cancels. Also the names that rest on a result
    measured on a busy machine (their own, or the original's)."""
    found, busy, frame = {}, set(), table(results)  # table's rows follow the results' records in order
    pairs = [(result, record) for result in results for record in result["records"]]
    for (result, record), row, unsure in zip(pairs, frame.itertuples(), withheld(frame)):
        name = f"{model}/latency/{row.setup}/{row.phase}-{row.tokens}"
        samples = np.asarray(record["samples_ms"])
        found[f"{name}/ms"] = Measurement(float(row.median_ms), tuple(samples.tolist()))
        busy |= {f"{name}/ms"} if row.contended else set()
        if (result["engine"] == "original" and record["threads"] == 1) or row.reduction != row.reduction:
            continue  # the baseline itself, or no baseline (NaN)
        found[f"{name}/reduction"] = Measurement(float(row.reduction))
        paired = np.asarray(record.get("baseline_samples_ms", []))
        if len(paired) == len(samples):
            found[f"{name}/ratio"] = Measurement(1 - float(row.reduction), tuple((samples / paired).tolist()))
        busy |= {f"{name}/reduction", f"{name}/ratio"} if unsure else set()
    return found, busy


def measurements(run_dir: Path, logs: Path) -> tuple[dict[str, Measurement], list[str]]:
    """The key numbers of one run, `model/what/.../kind -> Measurement`, and those measured on a busy machine."""
    found, busy = {}, set()
    for model_dir in sorted(p for p in Path(run_dir).iterdir() if (p / "model.json").exists()):
        model = model_dir.name
        if (path := model_dir / "quality.csv").exists():
            for row in pd.read_csv(path).itertuples():
                if row.metric in DEFAULT_RULES:
                    interval = (float(row.low), float(row.high)) if row.low == row.low else None  # NaN: exact
                    found[f"{model}/{row.plan}/{row.stage}/{row.task}/{row.metric}"] = Measurement(
                        float(row.value), interval=interval
                    )
        results = [json.loads(path.read_text()) for path in sorted((model_dir / "latency").glob("*.json"))]
        if any(r["engine"] == "original" for r in results):
            timed, slow = latency_measurements(model, results)
            found, busy = found | timed, busy | slow
        if (path := model_dir / "search.json").exists():
            found[f"{model}/search/plans_per_minute"] = Measurement(
                float(json.loads(path.read_text())["plans_per_minute"])
            )
    for path in sorted(Path(logs).glob("**/*.benchmark.tsv")):
        stage = path.relative_to(logs).with_suffix("").with_suffix("")  # <rule>/<model>[/<plan>]
        found[f"stage/{stage}/seconds"] = Measurement(float(pd.read_csv(path, sep="\t")["s"].iloc[-1]))
    return found, sorted(busy)


def record(run_dir, logs, config: dict, config_name: str, label: str | None = None) -> dict:
    sha = git_sha()
    found, busy = measurements(Path(run_dir), Path(logs))
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "label": label,
        "git": sha.removesuffix("-dirty"),
        "dirty": sha.endswith("-dirty"),
        "machine": machine(),
        "config": config_name,
        "config_hash": settings_hash(config),
        "run_dir": str(run_dir),
        "packages": installed(),
        "metrics": {name: m.value for name, m in found.items()},
        "samples": {name: list(m.samples) for name, m in found.items() if m.samples},
        "intervals": {name: list(m.interval) for name, m in found.items() if m.interval},
        "contended": busy,
    }


def measurement(entry: dict, name: str) -> Measurement | None:
    """A record's metric with what it rests on (records from before samples were kept have the value alone)."""
    if name not in entry["metrics"]:
        return None
    interval = entry.get("intervals", {}).get(name)
    return Measurement(
        entry["metrics"][name], tuple(entry.get("samples", {}).get(name, ())), interval and tuple(interval)
    )


def append(history, entry: dict) -> None:
    """Add one line; earlier lines are never rewritten (one write of a whole line, then fsync)."""
    history = Path(history)
    history.parent.mkdir(parents=True, exist_ok=True)
    with open(history, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load(history) -> tuple[list[dict], list[str]]:
    """The records, oldest first, and a line for each line that could not be read (it is skipped)."""
    records, problems = [], []
    path = Path(history)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines() if path.exists() else [], start=1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or "metrics" not in entry:
                raise ValueError("not a record")
            records.append(entry)
        except ValueError as err:
            problems.append(f"{path}:{number}: skipped a corrupt line ({err})")
    return records, problems


def find(records: list[dict], baseline: str) -> dict | None:
    """The newest record labelled `baseline`, or whose git sha starts with it."""
    return next((r for r in reversed(records) if r.get("label") == baseline or r["git"].startswith(baseline)), None)
