"""The stage `cqil track <action>`: one run function per action over the history of runs.

    cqil track record --run-dir results/default --logs logs/default --history results/history.jsonl
    cqil track compare --history results/history.jsonl --baseline v0.1 --fail-on-regression --confirm
    cqil track dashboard --history results/history.jsonl --out results/dashboard.html
    cqil track trends --history results/history.jsonl --out-dir results/trends

`record` appends this run's record to the history (history.py); `compare` gives each metric of the newest
record a verdict against the previous comparable record and a baseline (compare.py); `dashboard` draws the
history as one HTML page (dashboard.py); `trends` writes github-action-benchmark's files. By default only
records of the same config hash and machine fingerprint are compared or drawn. `run_track` is what the command
line calls: it hands the action the options it takes.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

from ..errors import CqilError
from ..io import atomic, write_csv, write_json
from .compare import comparable, compare, confirmed_regressions, differences, package_changes
from .dashboard import page
from .history import append, find, load, record
from .settings import TrackSettings, kind


def readable(history) -> list[dict]:
    """The history's records, oldest first: a corrupt line is a warning, a history without a record an error."""
    records, problems = load(history)
    for problem in problems:
        print(f"cqil: warning: {problem}", file=sys.stderr)
    if not records:
        raise CqilError(f"--history {history}: no readable record")
    return records


def pick(records: list[dict], any_record: bool) -> tuple[list[dict], int]:
    """The records the newest one is compared with (all, or those comparable to it) and how many were left out."""
    pool = records[:-1] if any_record else comparable(records[:-1], records[-1])
    return pool, len(records) - 1 - len(pool)


def benchmark_json(entry: dict, settings: TrackSettings) -> dict[str, list[dict]]:
    """The record in github-action-benchmark's custom formats: {tool: [{name, unit, value}]}."""
    out = {"customSmallerIsBetter": [], "customBiggerIsBetter": []}
    for name, value in sorted(entry["metrics"].items()):
        rule = settings.rule(kind(name))
        if rule and name not in entry.get("contended", ()):
            tool = "customSmallerIsBetter" if rule.direction == "lower" else "customBiggerIsBetter"
            out[tool].append({"name": name, "unit": kind(name), "value": value, "extra": f"git {entry['git']}"})
    return out


def track_record(settings: TrackSettings, *, history, run_dir=None, logs=None, config="{}", config_name="", out=None):
    """`record`: append this run's record (its metrics from `run_dir`, its stages' wall times from `logs`)."""
    if not (run_dir and logs and Path(run_dir).is_dir()):
        raise CqilError(f"track record: --run-dir {run_dir!r} and --logs {logs!r} must name a run's folders")
    entry = record(run_dir, logs, json.loads(config), config_name, settings.label)
    append(history, entry)
    if out:
        write_json(out, entry)
    busy = f", {len(entry['contended'])} measured on a busy machine" if entry["contended"] else ""
    print(f"{history}: appended a record with {len(entry['metrics'])} metrics{busy}")
    return 0


def track_trends(settings: TrackSettings, *, history, out_dir=None) -> int:
    """`trends`: the newest record as github-action-benchmark's files, one per direction, in `out_dir`."""
    if not out_dir:
        raise CqilError("track trends: needs --out-dir")
    records = readable(history)
    for tool, entries in benchmark_json(records[-1], settings).items():
        with atomic(Path(out_dir) / f"{tool}.json") as tmp:
            tmp.write_text(json.dumps(entries, indent=1) + "\n")
    return 0


def track_dashboard(settings: TrackSettings, *, history, out=None, any_record: bool = False) -> int:
    """`dashboard`: one HTML page of the history, a trend per metric (the records comparable to the newest)."""
    records = readable(history)
    pool, skipped = pick(records, any_record)
    shown = [*pool, records[-1]]
    rules = {name: rule for name in records[-1]["metrics"] if (rule := settings.rule(kind(name)))}
    text, charts = page(shown, rules)
    out = Path(out or "results/dashboard.html")
    with atomic(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    left = f"; {skipped} records of another config or machine left out (--any-record shows them)" if skipped else ""
    print(f"{out}: {charts} charts over {len(shown)} records{left}")
    return 0


def regressions_against(name: str, old: dict, records: list[dict], settings: TrackSettings, out, confirm: bool):
    """Print the newest record against `old` (a table of what changed, what makes them not comparable, the
    packages that changed) and return the metrics that regressed; with `confirm`, a latency only where a second
    measurement repeats it."""
    newest = records[-1]
    earlier = comparable(records[: records.index(old) + 1], newest)  # the history's spread: up to `old`
    table = compare(newest, old, settings, earlier)
    changed = table[~table.status.isin(["unchanged", "untracked"])]
    counts = ", ".join(f"{count} {status}" for status, count in table.status.value_counts().items())
    print(f"\n{name} (git {old['git'][:8]}, {old['date']}): {counts}")
    for difference in differences(newest, old):
        print(f"not comparable: {difference}")
    drifted = package_changes(newest, old)
    print(f"packages changed: {', '.join(drifted)}" if drifted else "packages: the same versions")
    print(changed.to_markdown(index=False, floatfmt=".4g") if len(changed) else "every metric unchanged")
    if out:
        write_csv(Path(out).with_name(f"{Path(out).stem}-{name.split()[0]}.csv"), table)
    regressed = list(table.metric[table.status == "regressed"])
    latency = [metric for metric in regressed if "/latency/" in metric]
    if confirm and latency:
        kept = confirmed_regressions(newest, old, latency, settings, earlier)
        regressed = [metric for metric in regressed if metric not in latency or metric in kept]
    return regressed


def track_compare(
    settings: TrackSettings,
    *,
    history,
    out=None,
    baseline=None,
    fail_on_regression: bool = False,
    confirm: bool = False,
    any_record: bool = False,
) -> int:
    """`compare`: the newest record against the previous comparable one and, if asked, a baseline (a label or a
    git sha). 1 when `fail_on_regression` and a metric regressed, else 0."""
    records = readable(history)
    pool, skipped = pick(records, any_record)
    if skipped:
        print(f"{skipped} earlier records of another config or machine are not compared (--any-record compares them)")
    against = [("previous", pool[-1] if pool else None)]
    if baseline:
        against.append((f"baseline {baseline}", find(records[:-1], baseline)))
        if against[-1][1] is None:
            raise CqilError(f"--baseline {baseline!r}: no earlier record has that label or git sha")
    regressions = 0
    for name, old in against:
        if old is None:
            print(f"{name}: none (no earlier comparable record)")
            continue
        regressions += len(regressions_against(name, old, records, settings, out, confirm))
    if regressions and fail_on_regression:
        print(f"cqil: {regressions} metric(s) regressed", file=sys.stderr)
        return 1
    return 0


ACTIONS = {"record": track_record, "compare": track_compare, "dashboard": track_dashboard, "trends": track_trends}


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
    confirm: bool = False,
    any_record: bool = False,
    out_dir=None,
) -> int:
    """The stage: `record` this run in the history; and the commands `compare` (the newest record against the
    previous comparable one and a baseline), `dashboard` (one HTML page of the history) and `trends`
    (github-action-benchmark files). Returns the exit status, 1 when `fail_on_regression` and a metric regressed
    (with `confirm`: and a second measurement of a regressed latency repeats it)."""
    options = dict(locals())  # the command line's options, by name
    run = ACTIONS[action]  # each action takes the options it reads; the command line accepts them all
    return run(settings, **{name: options[name] for name in inspect.signature(run).parameters if name != "settings"})
