"""Benchmark tracking: one record per pipeline run in an append-only history, compared run to run.

    cqil track record --run-dir results/default --logs logs/default --history results/history.jsonl
    cqil track compare --history results/history.jsonl --baseline v0.1 --fail-on-regression

A record holds where it came from (git sha and dirty flag, date, machine, config name and hash, the
version of every installed package) and the run's key metrics, flattened to `name -> value`: per-plan perplexity, KL
and top-1 agreement, task accuracies, measured latency reductions, search throughput and each stage's
wall time (Snakemake's benchmark files). Each metric's kind (the name's last part) decides whether
lower or higher is better and how much change is noise (`Threshold`, set in config). The history is
only ever appended to; a corrupt line is reported and skipped, never fatal.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .environment import canonical, changes, installed
from .io import git_sha, machine, settings_hash


@dataclass(frozen=True)
class Threshold:
    direction: str  # lower | higher: which way is better
    tolerance: float  # change in the bad direction that is still noise ...
    relative: bool = True  # ... as a fraction of the old value, or in the metric's own units


DEFAULT_THRESHOLDS = {
    "perplexity": Threshold("lower", 0.05), "kl": Threshold("lower", 0.10), "top1": Threshold("higher", 0.02, False),
    "acc": Threshold("higher", 0.02, False), "word_perplexity": Threshold("lower", 0.05),
    "reduction": Threshold("higher", 0.05, False), "plans_per_minute": Threshold("higher", 0.20),
    "seconds": Threshold("lower", 0.50),
}


@dataclass(frozen=True)
class TrackSettings:
    thresholds: dict = field(default_factory=dict)  # metric kind -> {direction, tolerance, relative}
    label: str | None = None  # a name for this run's record, to compare against later (a baseline)

    def threshold(self, kind: str) -> Threshold | None:
        given = self.thresholds.get(kind)
        return Threshold(**given) if given else DEFAULT_THRESHOLDS.get(kind)


# --- One record from a run's artifacts -------------------------------------------------------------

def metrics(run_dir: Path, logs: Path) -> dict[str, float]:
    """The key numbers of one run, `model/what/.../kind -> value`."""
    found = {}
    for model_dir in sorted(p for p in Path(run_dir).iterdir() if (p / "model.json").exists()):
        model = model_dir.name
        if (path := model_dir / "quality.csv").exists():
            for row in pd.read_csv(path).itertuples():
                if row.metric in DEFAULT_THRESHOLDS:
                    found[f"{model}/{row.plan}/{row.stage}/{row.task}/{row.metric}"] = float(row.value)
        if (path := model_dir / "latency.csv").exists():
            for row in pd.read_csv(path).itertuples():
                if row.reduction == row.reduction and row.setup != "original, 1 thread":  # not NaN, not the baseline
                    found[f"{model}/latency/{row.setup}/{row.phase}-{row.tokens}/reduction"] = float(row.reduction)
        if (path := model_dir / "search.json").exists():
            found[f"{model}/search/plans_per_minute"] = float(json.loads(path.read_text())["plans_per_minute"])
    for path in sorted(Path(logs).glob("**/*.benchmark.tsv")):
        stage = path.relative_to(logs).with_suffix("").with_suffix("")  # <rule>/<model>[/<plan>]
        found[f"stage/{stage}/seconds"] = float(pd.read_csv(path, sep="\t")["s"].iloc[-1])
    return found


def record(run_dir, logs, config: dict, config_name: str, label: str | None = None) -> dict:
    sha = git_sha()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "label": label,
            "git": sha.removesuffix("-dirty"), "dirty": sha.endswith("-dirty"), "machine": machine(),
            "config": config_name, "config_hash": settings_hash(config), "packages": installed(),
            "metrics": metrics(Path(run_dir), Path(logs))}


# --- The history: append only ----------------------------------------------------------------------

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


# --- Comparing two records -------------------------------------------------------------------------

def package_changes(new: dict, old: dict) -> list[str]:
    """`name old -> new` for each package whose version differs between the records' environments.

    Records written before every package was stored hold six (`versions`); then only those count.
    """
    def stored(record):
        return {canonical(name): version for name, version in (record.get("packages") or record.get("versions", {})).items()}

    return changes(stored(old), stored(new), both_complete="packages" in new and "packages" in old)


def compare(new: dict, old: dict, settings: TrackSettings) -> pd.DataFrame:
    """A row per metric: old, new, change; `regression` where it moved the bad way by more than the threshold.

    Beside each metric that moved (regression or improvement), `packages` names the package versions that
    differ between the two records: a library release is often the reason.
    """
    drifted = package_changes(new, old)
    shown = "; ".join(drifted[:3] + ([f"and {len(drifted) - 3} more"] if len(drifted) > 3 else [])) or None
    rows = []
    for name in sorted(set(new["metrics"]) | set(old["metrics"])):
        before, after = old["metrics"].get(name), new["metrics"].get(name)
        limit = settings.threshold(name.rsplit("/", 1)[-1])
        status = "new" if before is None else "missing" if after is None else "untracked" if limit is None else \
            judge(before, after, limit)
        rows.append({"metric": name, "old": before, "new": after,
                     "change": None if before is None or after is None else after - before,
                     "better": limit.direction if limit else None, "status": status,
                     "packages": shown if status in ("regression", "improvement") else None})
    return pd.DataFrame(rows, columns=["metric", "old", "new", "change", "better", "status", "packages"])


def judge(before: float, after: float, limit: Threshold) -> str:
    worse = (after - before) if limit.direction == "lower" else (before - after)  # > 0: moved the bad way
    allowed = limit.tolerance * (abs(before) if limit.relative else 1)
    if worse > allowed:
        return "regression"
    return "improvement" if -worse > allowed else "ok"


# --- Trends and dashboards -------------------------------------------------------------------------

def benchmark_json(entry: dict, settings: TrackSettings) -> dict[str, list[dict]]:
    """The record in github-action-benchmark's custom formats: {tool: [{name, unit, value}]}."""
    out = {"customSmallerIsBetter": [], "customBiggerIsBetter": []}
    for name, value in sorted(entry["metrics"].items()):
        kind = name.rsplit("/", 1)[-1]
        limit = settings.threshold(kind)
        if limit:
            tool = "customSmallerIsBetter" if limit.direction == "lower" else "customBiggerIsBetter"
            out[tool].append({"name": name, "unit": kind, "value": value, "extra": f"git {entry['git']}"})
    return out


def trends(records: list[dict]) -> pd.DataFrame:
    """Long table of every metric of every record: record index, date, git, metric, kind, value."""
    return pd.DataFrame([{"record": i, "date": r["date"], "git": r["git"][:8], "metric": name,
                          "kind": name.rsplit("/", 1)[-1], "value": value}
                         for i, r in enumerate(records) for name, value in r["metrics"].items()])
