"""The quality table: every variant's scores with intervals, and its differences from the original.

    run_quality(QualitySettings(), ["eval/original.json", ...], scores=[...], finetune=[...], out="quality.csv")
    run_compare(a="kd-generated/eval/S16-E28-P2-D0-finetuned.json", b="default/eval/...", original=..., out="x.csv")

For each task, the original, a plan zero-shot and the same plan fine-tuned answered the same questions
(`evaluate.py` keeps every question's score), so each difference from the original gets a 95% interval
from a paired bootstrap over questions (`stats.py`), and is marked distinguishable from zero when the
interval excludes 0. Tasks on which the original is not above chance (the lower end of its interval at
or below the chance rate 1/choices) are reported but kept out of the average. Fine-tuning's
`recovered` is the fraction of the zero-shot loss it wins back, given only where that loss is itself
distinguishable from zero (elsewhere there is nothing to recover: the ratio of two noises means nothing).
WikiText-2 is scored by perplexity (resampled over its blocks); the corpus's held-out perplexity, KL and
top-1 agreement come from the score and fine-tuning stages, without intervals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .io import write_csv, write_markdown
from .report import tradeoff_figure
from .stats import bootstrap_means, excludes_zero, interval, recovered

HELDOUT_METRICS = ("perplexity", "kl", "top1")  # on the corpus's held-out blocks, against the original
AVERAGE = "average"  # the task name of the mean over the tasks the original does above chance


@dataclass(frozen=True)
class QualitySettings:
    bootstrap: int = 2000  # resamples of the questions
    seed: int = 0
    level: float = 0.95  # of the intervals


def main_metric(items: dict) -> str:
    """What a task is scored by: length-normalised accuracy where lm-eval has it, accuracy otherwise; WikiText's
    mean NLL per token (reported as perplexity)."""
    return "nll" if "nll" in items else "acc_norm" if "acc_norm" in items else "acc"


def aligned(evals: list[dict], task: str, metric: str) -> np.ndarray:
    """Questions x variants: each variant's score on the questions all of them answered, in doc order."""
    common = sorted(set.intersection(*(set(e["items"][task]["doc_id"]) for e in evals)))
    columns = [dict(zip(e["items"][task]["doc_id"], e["items"][task][metric])) for e in evals]
    return np.array([[column[doc] for column in columns] for doc in common], dtype=float)


def metric_name(metric: str) -> str:
    """A task's metric as reported: WikiText's mean NLL is shown as perplexity."""
    return "perplexity" if metric == "nll" else metric


def chance(items: dict) -> float | None:
    """A task's chance rate in points, the mean of 1/choices over its questions (None: not multiple choice)."""
    return 100 * float(np.mean([1 / n for n in items["choices"]])) if "choices" in items else None


def add_average(points: dict, draws: dict, counted: list) -> None:
    """The mean over the `counted` (above-chance) tasks, of the points and of the draws: each task was resampled
    on its own, so the mean of their draws is a draw of the mean."""
    if counted:
        points[AVERAGE] = np.mean([points[task] for task in counted], axis=0)
        draws[AVERAGE] = np.mean([draws[task] for task in counted], axis=0)


def shown(metric: str, means):
    """Means as reported: accuracy in points, mean NLL as perplexity."""
    return np.exp(means) if metric == "nll" else 100 * np.asarray(means)


def run_quality(settings: QualitySettings, inputs, *, out, scores=(), finetune=(), figure=None) -> None:
    """The stage: the quality table of the original and each plan, zero-shot and fine-tuned, with 95% intervals,
    and each variant's difference from the original (`quality.csv`, `quality_diff.csv`, Markdown beside them;
    with `figure`, the trade-off figure: accuracy difference against ideal latency reduction)."""
    evals = [json.loads(Path(path).read_text()) for path in inputs]
    original = next(e for e in evals if e["stage"] == "original")
    variants = {(e["plan"], e["stage"]): e for e in evals}
    plans = list(dict.fromkeys(e["plan"] for e in evals if e["stage"] != "original"))
    ideal = {row["plan"]: row["ideal_reduction"] for row in (json.loads(Path(p).read_text())["plan"] for p in scores)}
    tasks = list(original["items"])
    metrics = {task: main_metric(original["items"][task]) for task in tasks}

    levels = [level_row(e, task, metrics[task], settings, seed) for e in evals for seed, task in enumerate(tasks)]
    rates = {task: chance(original["items"][task]) for task in tasks}
    above = {
        row["task"]: row["low"] > rates[row["task"]]
        for row in levels
        if row["stage"] == "original" and rates[row["task"]] is not None
    }
    for row in levels:
        row |= {"chance": rates[row["task"]], "above_chance": above.get(row["task"])}

    diffs = []
    for plan in plans:
        group = [original] + [
            variants[(plan, stage)] for stage in ("zeroshot", "finetuned") if (plan, stage) in variants
        ]
        shown_points, shown_draws = {}, {}
        for seed, task in enumerate(tasks):
            scores_ = aligned(group, task, metrics[task])
            shown_points[task] = shown(metrics[task], scores_.mean(axis=0))
            shown_draws[task] = shown(metrics[task], bootstrap_means(scores_, settings.bootstrap, settings.seed + seed))
        add_average(shown_points, shown_draws, [task for task in tasks if above.get(task)])
        for k, e in enumerate(group[1:], start=1):
            for task in shown_points:
                name = "accuracy" if task == AVERAGE else metric_name(metrics[task])
                diffs.append(
                    difference(e, task, name, shown_points[task], shown_draws[task], k, settings.level)
                    | {"above_chance": True if task == AVERAGE else above.get(task), "ideal_reduction": ideal.get(plan)}
                )
    levels += heldout_levels(scores, finetune)

    table = pd.DataFrame(levels)
    write_csv(out, table)
    pivot = table.assign(column=table.task + " " + table.metric).pivot_table(
        index=["plan", "stage"], columns="column", values="value", sort=False
    )
    write_markdown(Path(out).with_suffix(".md"), pivot.reset_index())
    differences = pd.DataFrame(diffs)
    path = Path(out).with_name(Path(out).stem + "_diff.csv")
    write_csv(path, differences)
    write_markdown(path.with_suffix(".md"), differences)
    if figure:
        tradeoff_figure(differences, figure)


def level_row(e: dict, task: str, metric: str, settings: QualitySettings, seed: int) -> dict:
    """A variant's score on a task, with its interval (its questions resampled)."""
    values = np.asarray(e["items"][task][metric], dtype=float)
    low, high = interval(
        shown(metric, bootstrap_means(values[:, None], settings.bootstrap, settings.seed + seed)[:, 0]), settings.level
    )
    return {
        "plan": e["plan"],
        "stage": e["stage"],
        "task": task,
        "metric": metric_name(metric),
        "value": float(shown(metric, values.mean())),
        "low": low,
        "high": high,
        "n": len(values),
    }


def difference(e: dict, task: str, metric: str, point: np.ndarray, draws: np.ndarray, k: int, level_: float) -> dict:
    """Variant k (a column of the points and draws) against the original (column 0); for the fine-tuned variant
    (k = 2, beside the zero-shot one in column 1) also the fraction of the zero-shot loss it recovers."""
    low, high = interval(draws[:, k] - draws[:, 0], level_)
    row = {
        "plan": e["plan"],
        "stage": e["stage"],
        "task": task,
        "metric": metric,
        "value": float(point[k]),
        "original": float(point[0]),
        "diff": float(point[k] - point[0]),
        "low": low,
        "high": high,
        "distinguishable": excludes_zero(low, high),
    }
    if k == 2 and excludes_zero(*interval(draws[:, 1] - draws[:, 0], level_)):  # only a real zero-shot loss
        share_low, share_high = interval(recovered(draws[:, 0], draws[:, 1], draws[:, 2]), level_)
        row |= {
            "recovered": float(recovered(point[0], point[1], point[2])),
            "recovered_low": share_low,
            "recovered_high": share_high,
        }
    return row


def heldout_levels(scores, finetune) -> list[dict]:
    """The corpus's held-out perplexity, KL and top-1 agreement: the original and each plan zero-shot
    (`cqil score` files), each plan fine-tuned (`cqil finetune` files)."""
    rows = []
    for i, path in enumerate(scores):
        record = json.loads(Path(path).read_text())
        pairs = ([("original", "original", record["original"])] if i == 0 else []) + [
            (record["plan"]["plan"], "zeroshot", record["plan"])
        ]
        rows += [
            {"plan": plan, "stage": stage, "task": "heldout", "metric": name, "value": metrics[name]}
            for plan, stage, metrics in pairs
            for name in HELDOUT_METRICS
            if name in metrics
        ]
    for path in finetune:
        record = json.loads(Path(path).read_text())
        rows += [
            {
                "plan": record["plan"],
                "stage": "finetuned",
                "task": "heldout",
                "metric": name,
                "value": (record["heldout_after"] or {})[name],
            }
            for name in HELDOUT_METRICS
            if name in (record["heldout_after"] or {})
        ]
    return rows


def run_compare(*, a, b, original, out, bootstrap: int = 2000, seed: int = 0, level: float = 0.95) -> None:
    """The stage: two evaluations of the same questions compared directly, b minus a per task with its 95% paired
    interval, and on the mean over the tasks on which `original` is above chance (e.g. a plan fine-tuned on two
    corpora: the KD-data ablation), as CSV and Markdown."""
    first, second, reference = (json.loads(Path(path).read_text()) for path in (a, b, original))
    rows = compared(first, second, reference, QualitySettings(bootstrap, seed, level))
    frame = pd.DataFrame([{"a": str(a), "b": str(b), **row} for row in rows])
    write_csv(out, frame)
    write_markdown(Path(out).with_suffix(".md"), frame.drop(columns=["a", "b"]))


def compared(first: dict, second: dict, reference: dict, settings: QualitySettings) -> list[dict]:
    """Rows of `second` minus `first` per task and on the average over the tasks `reference` does above chance."""
    tasks = [task for task in reference["items"] if task in first["items"] and task in second["items"]]
    rows, points, draws = [], {}, {}
    for index, task in enumerate(tasks):
        metric = main_metric(reference["items"][task])
        scores = aligned([first, second], task, metric)
        points[task] = shown(metric, scores.mean(axis=0))
        draws[task] = shown(metric, bootstrap_means(scores, settings.bootstrap, settings.seed + index))
        rate = chance(reference["items"][task])
        above = level_row(reference, task, metric, settings, index)["low"] > rate if rate is not None else None
        rows.append(
            comparison(task, metric_name(metric), points[task], draws[task], settings.level)
            | {"above_chance": above, "n": len(scores)}  # the questions both answered: fewer if their subsets differ
        )
    counted = [row["task"] for row in rows if row["above_chance"]]
    add_average(points, draws, counted)
    if counted:
        rows.append(
            comparison(AVERAGE, "accuracy", points[AVERAGE], draws[AVERAGE], settings.level)
            | {"above_chance": True, "n": sum(row["n"] for row in rows if row["task"] in counted)}
        )
    return rows


def comparison(task: str, metric: str, point: np.ndarray, draws: np.ndarray, level_: float) -> dict:
    low, high = interval(draws[:, 1] - draws[:, 0], level_)
    return {
        "task": task,
        "metric": metric,
        "a_value": float(point[0]),
        "b_value": float(point[1]),
        "diff": float(point[1] - point[0]),
        "low": low,
        "high": high,
        "distinguishable": excludes_zero(low, high),
    }
