"""The paper's tables from the stage tables only: CSV, Markdown and LaTeX (`cqil tables`).

    cqil tables --quality smollm2-135m=quality.csv --latency latency.csv --predictions predictions.csv --out-dir tables/

The quality table (each plan's scores with intervals, the official numbers beside ours) and the latency summary
(measured where measured, predicted by the simulator otherwise). The figures are cqil/report.py's.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import CqilError
from .io import atomic, write_csv, write_markdown
from .plan import Setup

# LLaMA-1-7B, KD fine-tuned, lm-eval 0.4.1, accuracy in %: the official README (github.com/Photooon/CQIL), keyed
# by the tasks of config/paper.yaml that measure them (MMLU 5-shot: mmlu_5shot). Its D1 adapter and numbers come
# from the official code's arithmetic, this package's `-official` bypass mode (README, "Plans").
OFFICIAL = {
    "llama-7b": {
        ("original", "original"): {"sciq": 93.0, "winogrande": 70.0, "arc_easy": 72.9, "mmlu_5shot": 35.1},
        ("S12-E30-P2-D0", "finetuned"): {"sciq": 91.6, "winogrande": 69.1, "arc_easy": 70.1, "mmlu_5shot": 33.3},
        ("S12-E30-P2-D1-official", "finetuned"): {
            "sciq": 91.7,
            "winogrande": 68.4,
            "arc_easy": 70.0,
            "mmlu_5shot": 32.5,
        },
        ("S14-E30-P4-D0", "finetuned"): {"sciq": 90.0, "winogrande": 68.2, "arc_easy": 65.5, "mmlu_5shot": 33.1},
    }
}


def quality_table(levels: pd.DataFrame, diffs: pd.DataFrame, model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's main table: a row per plan and stage (original, zero-shot, fine-tuned); per task its score
    (accuracy in %, perplexity) and the difference from the original with its 95% interval, `*` where that
    interval excludes 0; the mean over the above-chance tasks and the share of the zero-shot loss that
    fine-tuning recovers (shown where the zero-shot loss itself is distinguishable from 0); the held-out KL;
    for a model with published numbers, the official value beside ours.

    Returns the numbers (for CSV) and the same table written out (for Markdown and LaTeX).
    """
    if diffs.empty:  # only the original was evaluated
        diffs = pd.DataFrame(columns=["plan", "stage", "task", "metric", "diff", "low", "high", "distinguishable"])
    metric = dict(zip(diffs.task, diffs.metric))
    tasks = [t for t in dict.fromkeys(levels.task) if t != "heldout"] + (["average"] if "average" in metric else [])
    names = {task: metric.get(task, "perplexity" if task == "wikitext2" else "acc_norm") for task in tasks}
    official = OFFICIAL.get(model, {})
    numbers, written = [], []
    for (plan, stage), part in levels.groupby(["plan", "stage"], sort=False):
        row, text = {"model": model, "plan": plan, "stage": stage}, {"model": model, "plan": plan, "stage": stage}
        mine = diffs[(diffs.plan == plan) & (diffs.stage == stage)].set_index("task")
        for task in tasks:
            published = official.get((plan, stage), {}).get(task.removesuffix("_local"))
            task_cells(row, text, task, names[task], part, mine, diffs, published)
        if stage == "finetuned" and "average" in mine.index:
            recovered_cells(row, text, mine.loc["average"])
        kl = part[(part.task == "heldout") & (part.metric == "kl")].value
        if len(kl):
            row["heldout kl"], text["heldout kl"] = float(kl.iloc[0]), f"{kl.iloc[0]:.3f}"
        numbers.append(row)
        written.append(text)
    order = ["model", "plan", "stage"]
    order += [f"{t.removesuffix('_local')} {names[t]}{part}" for t in tasks for part in ("", " official", " diff")]
    numbers, written = pd.DataFrame(numbers), pd.DataFrame(written)
    present = [column for column in order + ["recovered", "heldout kl"] if column in written]
    extra = [c for c in numbers.columns if c not in present]  # the intervals, beside their difference in the CSV
    numbers = numbers[[c for column in present for c in [column] + [e for e in extra if e.rsplit(" ", 1)[0] == column]]]
    return numbers, written[present].fillna("")


def task_cells(row: dict, text: dict, task: str, name: str, part, mine, diffs, published: float | None) -> None:
    """One task's cells of a quality table row, as numbers (`row`) and as text: its score, the official one,
    the difference from the original with its interval (and, in the numbers, the interval's ends)."""
    column = f"{task.removesuffix('_local')} {name}"
    value = part[(part.task == task) & (part.metric == name)].value
    if task == "average":  # the mean over the above-chance tasks: in the differences, beside each plan's
        value = (mine.loc[[task], "value"] if task in mine.index else diffs[diffs.task == task].original)[:1]
    if len(value):
        row[column], text[column] = float(value.iloc[0]), f"{value.iloc[0]:.1f}"
    if published is not None:
        row[f"{column} official"], text[f"{column} official"] = published, f"{published:.1f}"
    if task in mine.index:
        d = mine.loc[task]
        text[f"{column} diff"] = f"{d['diff']:+.1f} [{d.low:+.1f}, {d.high:+.1f}]" + ("*" if d.distinguishable else "")
        row[f"{column} diff"] = d["diff"]
        row |= {
            f"{column} diff low": d.low,
            f"{column} diff high": d.high,
            f"{column} diff distinguishable": d.distinguishable,
        }


def recovered_cells(row: dict, text: dict, average) -> None:
    """The share of the zero-shot loss (task average) that fine-tuning recovers, with its interval."""
    share = average.get("recovered", float("nan"))  # quality.difference gives it only for a real zero-shot loss
    row["recovered"] = share
    text["recovered"] = (
        f"{100 * share:.0f}% [{100 * average.recovered_low:.0f}, {100 * average.recovered_high:.0f}]"
        if pd.notna(share)
        else "(no zero-shot loss to recover)"
    )
    row |= {"recovered low": average.get("recovered_low"), "recovered high": average.get("recovered_high")}


def latency_summary(measured: list[pd.DataFrame], predicted: pd.DataFrame | None = None) -> pd.DataFrame:
    """Original, CQIL and TP: measured on this machine where measured, predicted by the simulator otherwise
    (the `source` column says which), with the ideal reduction and the fraction of it achieved."""
    columns = ["source", "model", "setup", "phase", "tokens", "ms", "reduction", "ideal", "of_ideal", "paper"]
    rows = [frame.assign(source="measured (this CPU)", ms=frame.median_ms, paper=None) for frame in measured]
    if predicted is not None:
        rows.append(
            predicted.rename(columns={"shape": "model"}).assign(
                source="predicted (" + predicted.hardware + ")",
                of_ideal=predicted.reduction / predicted.ideal.where(predicted.ideal > 0),
            )
        )
    if not rows:
        return pd.DataFrame(columns=columns)
    table = pd.concat(rows, ignore_index=True)
    setups = table.setup.map(Setup.parse)
    thread_scaling = setups.map(lambda setup: setup.engine == "original" and setup.threads not in (None, 1))
    return table[~thread_scaling][columns]  # the original's other thread counts stay in latency.csv


def write_table(frame: pd.DataFrame, path, written: pd.DataFrame | None = None) -> None:
    """`path`.csv (the numbers), .md and .tex (`written`, the numbers as text, where given)."""
    path, written = Path(path), frame if written is None else written
    write_csv(path.with_suffix(".csv"), frame)
    write_markdown(path.with_suffix(".md"), written)
    with atomic(path.with_suffix(".tex")) as tmp:
        tmp.write_text(written.to_latex(index=False, float_format="%.3g", na_rep="--"))


def run_tables(*, quality: list[str], out_dir, latency=(), predictions=None) -> None:
    """The stage: the paper's tables (quality, with intervals and the official numbers beside ours; latency
    measured and predicted), each as CSV, Markdown and LaTeX. `quality`: MODEL=PATH of each model's quality.csv
    (its quality_diff.csv lies beside it)."""
    numbers, written = [], []
    for item in quality:
        model, _, path = item.partition("=")
        if not path:
            raise CqilError(f"--quality {item!r}: expected MODEL=PATH")
        diffs = Path(path).with_name(Path(path).stem + "_diff.csv")
        table, text = quality_table(pd.read_csv(path), pd.read_csv(diffs) if diffs.exists() else pd.DataFrame(), model)
        numbers.append(table)
        written.append(text)
    out = Path(out_dir)
    write_table(
        pd.concat(numbers, ignore_index=True), out / "quality", pd.concat(written, ignore_index=True).fillna("")
    )
    predicted = pd.read_csv(predictions) if predictions else None
    write_table(latency_summary([pd.read_csv(path) for path in latency], predicted), out / "latency")
