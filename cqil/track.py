"""Benchmark tracking: one record per pipeline run in an append-only history, compared run to run.

    cqil track record --run-dir results/default --logs logs/default --history results/history.jsonl
    cqil track compare --history results/history.jsonl --baseline v0.1 --fail-on-regression --confirm
    cqil track dashboard --history results/history.jsonl --out results/dashboard.html

A record holds where it came from (git sha and dirty flag, date, machine, config name and hash, the
version of every installed package) and the run's key metrics, flattened to `name -> value`: per-plan
perplexity, KL and top-1 agreement, task accuracies, measured latencies and reductions, search throughput
and each stage's wall time (Snakemake's benchmark files). Beside the values it keeps what they rest on:
every timed repeat of a latency (`samples`), the bootstrap interval of a quality number (`intervals`), and
which latencies were measured on a busy machine (`contended`, cqil/latency/contention.py).

`compare` gives each metric a verdict from those (cqil/verdict.py): regressed, improved, unchanged or
inconclusive, with the metric kind's minimum effect (the name's last part; `Rule`, set in config) and, once
the history holds a few records of the same config on the same machine, their spread. By default it compares
only records of the same config hash and machine fingerprint. The history is only ever appended to; a
corrupt line is reported and skipped, never fatal.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .dashboard import page
from .environment import canonical, changes, installed
from .errors import CqilError
from .io import atomic, git_sha, machine, settings_hash, write_csv, write_json
from .latency.table import result_setup, table, withheld
from .verdict import Measurement, Rule, verdict

DEFAULT_RULES = {  # metric kind -> which way is better, and the smallest change worth a verdict
    "perplexity": Rule("lower", 0.05),
    "kl": Rule("lower", 0.10),
    "top1": Rule("higher", 0.02, False),
    "acc": Rule("higher", 2.0, False),  # accuracy in points (quality.csv)
    "acc_norm": Rule("higher", 2.0, False),
    "word_perplexity": Rule("lower", 0.05),
    "ms": Rule("lower", 0.05, timed=True, drifts=True),  # a latency's median: judged by the history's spread
    "ratio": Rule("lower", 0.05, timed=True),  # its latency over the same repeat's original's: by its repeats
    "reduction": Rule("higher", 0.05, False, timed=True),  # 1 - ratio of medians: by the history's spread
    "plans_per_minute": Rule("higher", 0.20, timed=True),
    "seconds": Rule("lower", 0.50, timed=True),  # a stage's wall time, measured once per run
}
FINGERPRINT = ("cpu", "cores", "gpu", "gpus")  # what makes two machines the same machine for timings


def kind(name: str) -> str:
    """A metric's kind, the last part of its name (`.../prefill-512/ms` -> `ms`): which rule judges it."""
    return name.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class TrackSettings:
    label: str | None = None  # a name for this run's record, to compare against later (a baseline)
    min_effects: dict = field(default_factory=dict)  # metric kind -> {direction, min_effect, relative}
    level: float = 0.95  # a change is significant when its test's p-value is below 1 - level
    window: int = 10  # the history's spread of a metric: over this many earlier comparable records (3 at least)

    def __post_init__(self):
        allowed = ", ".join(f.name for f in fields(Rule))
        for kind, given in self.min_effects.items():
            try:
                rule = Rule(**given)
            except TypeError:
                raise CqilError(f"track.min_effects.{kind}: {given!r} needs the keys {allowed}") from None
            if rule.direction not in ("lower", "higher"):
                raise CqilError(f"track.min_effects.{kind}.direction: {rule.direction!r} is not one of lower, higher")
        if not 0 < self.level < 1:
            raise CqilError(f"track.level: {self.level} must lie between 0 and 1")

    def rule(self, kind: str) -> Rule | None:
        given = self.min_effects.get(kind)
        return Rule(**given) if given else DEFAULT_RULES.get(kind)


# --- One record from a run's artifacts -------------------------------------------------------------


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


def fingerprint(entry: dict) -> dict:
    return {key: (entry.get("machine") or {}).get(key) for key in FINGERPRINT}


def differences(new: dict, old: dict) -> list[str]:
    """What makes two records not comparable: another config, another machine."""
    found = []
    if new.get("config_hash") != old.get("config_hash"):
        found.append(
            f"config {old.get('config')} {str(old.get('config_hash'))[:8]} -> {new.get('config')} "
            f"{str(new.get('config_hash'))[:8]}"
        )
    if fingerprint(new) != fingerprint(old):
        before, after = fingerprint(old), fingerprint(new)
        found += [f"machine {key} {before[key]} -> {after[key]}" for key in FINGERPRINT if before[key] != after[key]]
    return found


def comparable(records: list[dict], new: dict) -> list[dict]:
    """The records of the same config hash and machine fingerprint as `new`, oldest first."""
    return [r for r in records if not differences(new, r)]


def spread(records: list[dict], name: str, window: int) -> float | None:
    """The standard deviation of a metric over the last `window` records (None below 3 of them)."""
    values = [
        r["metrics"][name] for r in records[-window:] if name in r["metrics"] and name not in r.get("contended", ())
    ]
    return float(np.std(values, ddof=1)) if len(values) >= 3 else None


def compare(new: dict, old: dict, settings: TrackSettings, history: list[dict] = ()) -> pd.DataFrame:
    """A row per metric: old, new, the change and its verdict (cqil/verdict.py). `history`: earlier records
    comparable to `new`, whose spread can raise a metric's minimum effect. A latency measured on a busy machine
    in either record is `contended`, not judged.

    Beside each metric that moved (regressed or improved), `packages` names the package versions that
    differ between the two records: a library release is often the reason.
    """
    drifted = package_changes(new, old)
    shown = "; ".join(drifted[:3] + ([f"and {len(drifted) - 3} more"] if len(drifted) > 3 else [])) or None
    busy = set(new.get("contended", ())) | set(old.get("contended", ()))
    rows = []
    for name in sorted(set(new["metrics"]) | set(old["metrics"])):
        before, after = measurement(old, name), measurement(new, name)
        rule = settings.rule(kind(name))
        judged = None
        if before is None or after is None or rule is None or name in busy:
            status = (
                "new"
                if before is None
                else "missing"
                if after is None
                else "untracked"
                if rule is None
                else "contended"
            )
        else:
            judged = verdict(before, after, rule, settings.level, spread(list(history), name, settings.window))
            status = judged.status
        rows.append(
            {
                "metric": name,
                "old": before and before.value,
                "new": after and after.value,
                "change": judged and judged.change,
                "min_effect": judged and judged.min_effect,
                "p": judged and judged.p,
                "noise": judged and judged.noise,
                "better": rule and rule.direction,
                "status": status,
                "packages": shown if status in ("regressed", "improved") else None,
            }
        )
    columns = ["metric", "old", "new", "change", "min_effect", "p", "noise", "better", "status", "packages"]
    return pd.DataFrame(rows, columns=columns)


# --- Confirming a latency regression ----------------------------------------------------------------


def latency_files(entry: dict, names: list[str]) -> dict[str, Path]:
    """The `cqil latency` result behind each latency metric in `names` (from the record's run folder)."""
    found = {}
    for path in sorted(Path(entry.get("run_dir") or f"results/{entry['config']}").glob("*/latency/*.json")):
        result = json.loads(path.read_text())
        setups = {str(result_setup(result, record["threads"])) for record in result["records"]}
        for name in names:
            if name.split("/")[0] == path.parent.parent.name and name.split("/")[2] in setups:
                found[name] = path
    return found


def remeasure_command(path: Path, out: Path) -> list[str]:
    """The `cqil latency` command that measures the result in `path` again, with its own settings, into `out`."""
    result = json.loads(Path(path).read_text())
    given = result["provenance"]["settings"]
    command = ["cqil", "latency", "--settings", json.dumps(given["settings"]), "--model", given["model"]]
    command += ["--engine", given["engine"], "--dtype", given["dtype"], "--device", given["device"], "--out", str(out)]
    command += ["--plan", result["plan"]] if result["plan"] else []
    return command + (["--degree", str(given["degree"])] if given.get("degree") else [])


def confirmed_regressions(new: dict, old: dict, names: list[str], settings: TrackSettings, history) -> list[str]:
    """The latency regressions among `names` that a second measurement repeats: each affected setup is timed
    once more (the command is printed, to run by hand too) and judged again against `old`."""
    files = latency_files(new, names)
    confirmed = []
    with tempfile.TemporaryDirectory() as scratch:
        again = {}
        for path in sorted(set(files.values())):
            command = remeasure_command(path, Path(scratch) / path.name)
            print(f"confirm: {shlex.join(command)}", flush=True)
            subprocess.run(command, check=True, env=os.environ)
            again[path] = Path(scratch) / path.name
        for name in names:
            if name not in files:
                print(f"confirm: {name}: no latency result to measure again; it counts")
                confirmed.append(name)
                continue
            model_dir = files[name].parent
            results = [json.loads(again.get(p, p).read_text()) for p in sorted(model_dir.glob("*.json"))]
            remeasured, busy = latency_measurements(name.split("/")[0], results)
            repeat = {
                **new,
                "metrics": {name: remeasured[name].value},
                "samples": {name: list(remeasured[name].samples)},
                "intervals": {},
                "contended": sorted(busy),
            }
            status = compare(repeat, old, settings, history).set_index("metric").loc[name, "status"]
            print(f"confirm: {name}: {status} when measured again")
            if status == "regressed":
                confirmed.append(name)
    return confirmed


# --- Trends and dashboards -------------------------------------------------------------------------


def benchmark_json(entry: dict, settings: TrackSettings) -> dict[str, list[dict]]:
    """The record in github-action-benchmark's custom formats: {tool: [{name, unit, value}]}."""
    out = {"customSmallerIsBetter": [], "customBiggerIsBetter": []}
    for name, value in sorted(entry["metrics"].items()):
        rule = settings.rule(kind(name))
        if rule and name not in entry.get("contended", ()):
            tool = "customSmallerIsBetter" if rule.direction == "lower" else "customBiggerIsBetter"
            out[tool].append({"name": name, "unit": kind(name), "value": value, "extra": f"git {entry['git']}"})
    return out


# --- The stage ------------------------------------------------------------------------------------


def pick(records: list[dict], any_record: bool) -> tuple[list[dict], int]:
    """The records the newest one is compared with (all, or those comparable to it) and how many were left out."""
    pool = records[:-1] if any_record else comparable(records[:-1], records[-1])
    return pool, len(records) - 1 - len(pool)


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
    if action == "record":
        if not (run_dir and logs and Path(run_dir).is_dir()):
            raise CqilError(f"track record: --run-dir {run_dir!r} and --logs {logs!r} must name a run's folders")
        entry = record(run_dir, logs, json.loads(config), config_name, settings.label)
        append(history, entry)
        if out:
            write_json(out, entry)
        busy = f", {len(entry['contended'])} measured on a busy machine" if entry["contended"] else ""
        print(f"{history}: appended a record with {len(entry['metrics'])} metrics{busy}")
        return 0
    records, problems = load(history)
    for problem in problems:
        print(f"cqil: warning: {problem}", file=sys.stderr)
    if not records:
        raise CqilError(f"--history {history}: no readable record")
    pool, skipped = pick(records, any_record)
    if action == "trends":
        for tool, entries in benchmark_json(records[-1], settings).items():  # github-action-benchmark
            with atomic(Path(out_dir) / f"{tool}.json") as tmp:
                tmp.write_text(json.dumps(entries, indent=1) + "\n")
        return 0
    if action == "dashboard":
        shown = [*pool, records[-1]]
        rules = {name: rule for name in records[-1]["metrics"] if (rule := settings.rule(kind(name)))}
        text, charts = page(shown, rules)
        out = Path(out or "results/dashboard.html")
        with atomic(out) as tmp:
            tmp.write_text(text, encoding="utf-8")
        left = f"; {skipped} records of another config or machine left out (--any-record shows them)" if skipped else ""
        print(f"{out}: {charts} charts over {len(shown)} records{left}")
        return 0
    newest = records[-1]
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
        regressions += len(regressed)
    if regressions and fail_on_regression:
        print(f"cqil: {regressions} metric(s) regressed", file=sys.stderr)
        return 1
    return 0
