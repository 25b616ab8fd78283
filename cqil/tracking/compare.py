"""Two records compared metric by metric, and a latency regression confirmed by timing it again.

Each metric gets a verdict (cqil/tracking/verdict.py): regressed, improved, unchanged or inconclusive, with
its kind's minimum effect (settings.py) and, once the history holds a few records of the same config on the
same machine, their spread. Only records of the same config hash and machine fingerprint are comparable.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..latency.table import result_setup
from .environment import canonical, changes
from .history import latency_measurements, measurement
from .settings import TrackSettings, kind
from .verdict import verdict

FINGERPRINT = ("cpu", "cores", "gpu", "gpus")  # what makes two machines the same machine for timings


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
    """A row per metric: old, new, the change and its verdict (verdict.py). `history`: earlier records
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
