"""The latency table from `cqil latency` results: one row per setup, phase and prompt length, with its reduction.

    cqil latency-table cqil.json original.json --out latency.csv --figure latency

Reads JSON with pandas only (no torch): `cqil track` and the simulator read results through it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import EngineError
from ..io import write_csv, write_markdown
from ..plan import Setup, parse_plan
from ..report import latency_figure
from .contention import contended, describe


def result_setup(result: dict, threads: int | None = None) -> Setup:
    """The setup a `cqil latency` result timed; `threads` tells the original's thread counts apart."""
    plan = parse_plan(result["plan"]) if result["plan"] else None
    return Setup(result["engine"], plan, result["degree"] or 1, threads if result["engine"] == "original" else None)


def table(results: list[dict]):
    """One row per setup, phase and prompt length, with the reduction against the 1-thread (1-rank) original:
    timed in the same run where the engine interleaved it (`baseline: same run`), else the original's own run."""
    rows = [
        {
            "model": result["model"],
            "setup": str(setup),
            "engine": result["engine"],
            "mode": result.get("mode", "eager"),  # results written before the modes were eager
            "ranks": result["ranks"],
            "threads": record["threads"],
            "phase": record["phase"],
            "tokens": record["tokens"],
            "batch_size": record["batch_size"],
            "median_ms": record["median_ms"],
            "p10_ms": record["p10_ms"],
            "p90_ms": record["p90_ms"],
            "baseline_ms": record.get("baseline_median_ms"),
            "baseline": "same run" if "baseline_median_ms" in record else "separate run",
            "ideal": setup.ideal(result["layers"]),
            "check_max_abs_diff": (result["check"] or {}).get("max_abs_diff"),
            "contended": contended(result),
        }
        for result in results
        for record in result["records"]
        for setup in [result_setup(result, record["threads"])]
    ]
    frame = pd.DataFrame(rows)
    key = ["mode", "phase", "tokens", "batch_size"]  # an engine is measured against the original in its own mode
    own = frame[(frame.engine == "original") & (frame.threads == 1)].set_index(key)["median_ms"]
    separate = frame.set_index(key).index.map(own).to_numpy(dtype=float)
    frame["baseline_ms"] = frame.baseline_ms.astype(float).fillna(pd.Series(separate, index=frame.index))
    frame["reduction"] = 1 - frame.median_ms / frame.baseline_ms
    frame["of_ideal"] = frame.reduction / frame.ideal.where(frame.ideal > 0)
    return frame


def withheld(frame: pd.DataFrame) -> pd.Series:
    """The rows of `table` whose reductions rest on a result measured on a busy machine: their own, or the 1-thread
    original's where they are measured against its separate run."""
    busy_original = frame[(frame.engine == "original") & (frame.threads == 1)].contended.any()
    return frame.contended | ((frame.baseline == "separate run") & busy_original)


def run_latency_table(inputs, *, out, figure=None, title: str = "") -> None:
    """The stage: the latency table (CSV, and Markdown beside it) and figure from `cqil latency` files of one model.
    A result measured on a busy machine (`load.contended`) keeps its row, marked, without its reductions, and the
    stage says so."""
    results = [json.loads(Path(path).read_text()) for path in inputs]
    if shared := [path for path, result in zip(inputs, results) if result.get("shared_gpu")]:
        raise EngineError(f"{shared[0]}: its ranks shared one GPU (a check of the CUDA path), not a timing for a table")
    for path, result in zip(inputs, results):
        if contended(result):
            print(
                f"cqil: warning: {path}: measured on a busy machine ({describe(result['load'])}): its reductions are "
                "left out of the table and the figure; rerun it on a quiet machine"
            )
    frame = table(results)
    frame.loc[withheld(frame), ["reduction", "of_ideal"]] = np.nan  # a contended row's times are kept, marked
    write_csv(out, frame)
    write_markdown(Path(out).with_suffix(".md"), frame.drop(columns=["model"]))
    if figure:
        latency_figure(frame, results, title, figure)
