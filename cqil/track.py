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
import sys
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .environment import canonical, changes, installed
from .errors import CqilError
from .io import atomic, git_sha, machine, settings_hash, write_csv, write_json
from .report import trend_figures


@dataclass(frozen=True)
class Threshold:
    direction: str  # lower | higher: which way is better
    tolerance: float  # change in the bad direction that is still noise ...
    relative: bool = True  # ... as a fraction of the old value, or in the metric's own units


DEFAULT_THRESHOLDS = {
    "perplexity": Threshold("lower", 0.05),
    "kl": Threshold("lower", 0.10),
    "top1": Threshold("higher", 0.02, False),
    "acc": Threshold("higher", 2.0, False),  # accuracy in points (quality.csv); issue 17 replaces these by tests
    "acc_norm": Threshold("higher", 2.0, False),
    "word_perplexity": Threshold("lower", 0.05),
    "reduction": Threshold("higher", 0.05, False),
    "plans_per_minute": Threshold("higher", 0.20),
    "seconds": Threshold("lower", 0.50),
}


@dataclass(frozen=True)
class TrackSettings:
    label: str | None = None  # a name for this run's record, to compare against later (a baseline)
    thresholds: dict = field(default_factory=dict)  # metric kind -> {direction, tolerance, relative}

    def __post_init__(self):
        allowed = ", ".join(f.name for f in fields(Threshold))
        for kind, given in self.thresholds.items():
            try:
                threshold = Threshold(**given)
            except TypeError:
                raise CqilError(f"track.thresholds.{kind}: {given!r} needs the keys {allowed}") from None
            if threshold.direction not in ("lower", "higher"):
                raise CqilError(
                    f"track.thresholds.{kind}.direction: {threshold.direction!r} is not one of lower, higher"
                )

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
                if row.reduction == row.reduction and not (
                    row.engine == "original" and row.threads == 1
                ):  # the baseline
                    found[f"{model}/latency/{row.setup}/{row.phase}-{row.tokens}/reduction"] = float(row.reduction)
        if (path := model_dir / "search.json").exists():
            found[f"{model}/search/plans_per_minute"] = float(json.loads(path.read_text())["plans_per_minute"])
    for path in sorted(Path(logs).glob("**/*.benchmark.tsv")):
        stage = path.relative_to(logs).with_suffix("").with_suffix("")  # <rule>/<model>[/<plan>]
        found[f"stage/{stage}/seconds"] = float(pd.read_csv(path, sep="\t")["s"].iloc[-1])
    return found


def record(run_dir, logs, config: dict, config_name: str, label: str | None = None) -> dict:
    sha = git_sha()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "label": label,
        "git": sha.removesuffix("-dirty"),
        "dirty": sha.endswith("-dirty"),
        "machine": machine(),
        "config": config_name,
        "config_hash": settings_hash(config),
        "packages": installed(),
        "metrics": metrics(Path(run_dir), Path(logs)),
    }


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
        return {
            canonical(name): version for name, version in (record.get("packages") or record.get("versions", {})).items()
        }

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
        status = (
            "new"
            if before is None
            else "missing"
            if after is None
            else "untracked"
            if limit is None
            else judge(before, after, limit)
        )
        rows.append(
            {
                "metric": name,
                "old": before,
                "new": after,
                "change": None if before is None or after is None else after - before,
                "better": limit.direction if limit else None,
                "status": status,
                "packages": shown if status in ("regression", "improvement") else None,
            }
        )
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
    return pd.DataFrame(
        [
            {
                "record": i,
                "date": r["date"],
                "git": r["git"][:8],
                "metric": name,
                "kind": name.rsplit("/", 1)[-1],
                "value": value,
            }
            for i, r in enumerate(records)
            for name, value in r["metrics"].items()
        ]
    )


# --- The stage ------------------------------------------------------------------------------------


def run_track(
    settings: TrackSettings,
    action: str,
    *,
    history="results/history.jsonl",
    run_dir=None,
    logs=None,
    config: str = "{}",
    config_name: str = "",
    out=None,
    baseline=None,
    fail_on_regression: bool = False,
    out_dir=None,
) -> int:
    """The stage: `record` this run in the history; and the commands `compare` (the newest record against the
    previous one and a baseline) and `trends` (figures, github-action-benchmark files). Returns the exit status,
    1 when `fail_on_regression` and a metric regressed."""
    if action == "record":
        if not (run_dir and logs and Path(run_dir).is_dir()):
            raise CqilError(f"track record: --run-dir {run_dir!r} and --logs {logs!r} must name a run's folders")
        entry = record(run_dir, logs, json.loads(config), config_name, settings.label)
        append(history, entry)
        if out:
            write_json(out, entry)
        print(f"{history}: appended a record with {len(entry['metrics'])} metrics")
        return 0
    records, problems = load(history)
    for problem in problems:
        print(f"cqil: warning: {problem}", file=sys.stderr)
    if not records:
        raise CqilError(f"--history {history}: no readable record")
    if action == "trends":
        for tool, entries in benchmark_json(records[-1], settings).items():  # github-action-benchmark
            with atomic(Path(out_dir) / f"{tool}.json") as tmp:
                tmp.write_text(json.dumps(entries, indent=1) + "\n")
        trend_figures(trends(records), out_dir)
        return 0
    against = [("previous", records[-2] if len(records) > 1 else None)]
    if baseline:
        against.append((f"baseline {baseline}", find(records[:-1], baseline)))
        if against[-1][1] is None:
            raise CqilError(f"--baseline {baseline!r}: no earlier record has that label or git sha")
    regressions = 0
    for name, old in against:
        if old is None:
            print(f"{name}: none (the history has one record)")
            continue
        table = compare(records[-1], old, settings)
        changed = table[table.status.isin(["regression", "improvement", "new", "missing"])]
        counts = ", ".join(f"{count} {status}" for status, count in table.status.value_counts().items())
        print(f"\n{name} (git {old['git'][:8]}, {old['date']}): {counts}")
        drifted = package_changes(records[-1], old)
        print(f"packages changed: {', '.join(drifted)}" if drifted else "packages: the same versions")
        print(changed.to_markdown(index=False, floatfmt=".4g") if len(changed) else "no change beyond the thresholds")
        if out:
            write_csv(Path(out).with_name(f"{Path(out).stem}-{name.split()[0]}.csv"), table)
        regressions += int((table.status == "regression").sum())
    if regressions and fail_on_regression:
        print(f"cqil: {regressions} regression(s) beyond the thresholds", file=sys.stderr)
        return 1
    return 0
