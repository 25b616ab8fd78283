"""The paper's claims on several models, side by side: one table and one figure from the models' finished runs.

    cqil claims results/default/smollm2-135m results/gemma3/gemma3-270m --out results/claims/claims.csv \
        --figure results/claims/claims.png

Each folder is one model's results of a run with the equal-depth baselines on (config/baselines.yaml, or an
overlay that turns them on). For every selected CQIL plan and each baseline matched to it (layer pruning by
ShortGPT's Block Influence and by SLEB's greedy rule, LP over the same groups), zero-shot and fine-tuned, the
table gives the held-out KL and WikiText-2 perplexity, the task average against the original, and the task
average against the CQIL plan itself: a paired interval over the same questions, so "CQIL beats pruning at equal
depth" is a claim with its uncertainty. The Markdown adds, per model, how alike adjacent layers' inputs are by
depth and which layers are least sensitive; the figure shows both against relative depth, and the intervals.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .errors import CqilError
from .io import atomic, save_figure, write_csv
from .quality import AVERAGE, QualitySettings, compared
from .report import similarity_matrix

STAGES = {"zeroshot": "", "finetuned": "-finetuned"}  # stage -> suffix of its evaluation's file name
METHODS = {"block_influence": "pruned (ShortGPT BI)", "greedy": "pruned (SLEB greedy)", "lp": "LP"}
NOT_COMPARED = {"vs_cqil_diff": np.nan, "vs_cqil_low": np.nan, "vs_cqil_high": np.nan, "vs_cqil_distinguishable": None}
NEEDED = ("model.json", "similarity.csv", "sensitivity.csv", "selected.json", "baselines.json", "comparison.csv")


def read_run(folder: Path) -> dict:
    """A model's finished results, checked to hold what the claims need."""
    missing = [name for name in NEEDED if not (folder / name).is_file()]
    if missing:
        raise CqilError(f"{folder}: no {', '.join(missing)} (a run with the baselines on writes them)")
    return {
        "info": json.loads((folder / "model.json").read_text()),
        "similarity": pd.read_csv(folder / "similarity.csv"),
        "sensitivity": pd.read_csv(folder / "sensitivity.csv"),
        "selected": json.loads((folder / "selected.json").read_text())["plans"],
        "baselines": json.loads((folder / "baselines.json").read_text())["baselines"],
        "comparison": pd.read_csv(folder / "comparison.csv"),
        "eval": lambda variant: json.loads((folder / "eval" / f"{variant}.json").read_text()),
    }


def average_against(run: dict, a: str, b: str, settings: QualitySettings) -> dict:
    """The task average of variant b minus variant a (same questions), with its paired interval."""
    rows = compared(run["eval"](a), run["eval"](b), run["eval"]("original"), settings)
    row = next((r for r in rows if r["task"] == AVERAGE), None)
    if row is None:  # the original is above chance on no task: there is no average to compare
        return NOT_COMPARED
    return {
        "vs_cqil_diff": row["diff"],
        "vs_cqil_low": row["low"],
        "vs_cqil_high": row["high"],
        "vs_cqil_distinguishable": row["distinguishable"],
    }


def claim_rows(name: str, run: dict, settings: QualitySettings) -> list[dict]:
    """One row per selected plan that baselines were matched to, stage and method (CQIL itself first, then its
    baselines)."""
    levels = run["comparison"].set_index(["variant", "stage"])
    columns = ["depth", "gpus", "heldout_kl", "wikitext2_ppl", "wikitext2_low", "wikitext2_high"]
    columns += ["average_diff", "average_low", "average_high", "average_distinguishable"]
    rows = []
    for plan in [plan for plan in run["selected"] if any(b["plan"] == plan for b in run["baselines"])]:
        matched = [(b["rule"], b["variant"]) for b in run["baselines"] if b["plan"] == plan]
        for stage, suffix in STAGES.items():
            for rule, variant in [("cqil", plan), *matched]:
                row = {"model": name, "layers": run["info"]["layers"], "plan": plan, "stage": stage}
                row |= {"method": METHODS.get(rule, "CQIL"), "variant": variant}
                row |= levels.loc[(variant, stage), columns].to_dict()
                if rule == "cqil":
                    row |= NOT_COMPARED
                else:
                    row |= average_against(run, plan + suffix, variant + suffix, settings)
                rows.append(row)
    return rows


def adjacent_similarity(frame: pd.DataFrame) -> np.ndarray:
    """cos(input of layer i-1, input of layer i) for i = 1 .. L-1."""
    return np.diagonal(similarity_matrix(frame), 1)


def least_sensitive(frame: pd.DataFrame, count: int = 3) -> list[int]:
    """The layers whose output changes least (KL) when they read the input of the layer before them."""
    rows = frame[(frame["layer"] >= 0) & (frame["distance"] == 1)]
    return [int(layer) for layer in rows.nsmallest(count, "kl")["layer"]]


def summary_row(name: str, run: dict) -> dict:
    """How alike adjacent layers' inputs are in each third of the depth, and where the least sensitive layers are."""
    cosine, layers = adjacent_similarity(run["similarity"]), run["info"]["layers"]
    thirds = np.array_split(cosine, 3)
    quiet = least_sensitive(run["sensitivity"])
    return {
        "model": name,
        "family": run["info"]["family"],
        "parameters": run["info"]["parameters"],
        "layers": layers,
        "adjacent_cosine_first_third": float(thirds[0].mean()),
        "adjacent_cosine_middle_third": float(thirds[1].mean()),
        "adjacent_cosine_last_third": float(thirds[2].mean()),
        "least_sensitive_layers": " ".join(map(str, quiet)),
        "their_relative_depth": " ".join(f"{layer / layers:.2f}" for layer in quiet),
        "selected": " ".join(run["selected"]),
    }


def claims_figure(runs: dict[str, dict], table: pd.DataFrame, path) -> None:
    """Adjacent similarity and sensitivity against relative depth; held-out KL and the task average against the
    original (95% intervals) for each method, zero-shot and fine-tuned."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), layout="constrained")
    for name, run in runs.items():
        layers = run["info"]["layers"]
        cosine = adjacent_similarity(run["similarity"])
        axes[0, 0].plot(np.arange(1, layers) / layers, cosine, "-o", ms=3, label=name)
        rows = run["sensitivity"][(run["sensitivity"]["layer"] >= 0) & (run["sensitivity"]["distance"] == 1)]
        axes[0, 1].semilogy(rows["layer"] / layers, rows["kl"], "-o", ms=3, label=name)
    axes[0, 0].set(xlabel="relative depth i / L", ylabel="cos(input of i-1, input of i)", title="adjacent similarity")
    axes[0, 1].set(xlabel="relative depth i / L", ylabel="KL to the original", title="layer i on the input of i-1")
    labels = [f"{r.model}\n{r.plan}\n{r.method}" for r in table[table["stage"] == "finetuned"].itertuples()]
    positions = np.arange(len(labels))
    for offset, (stage, marker) in zip((-0.15, 0.15), (("zeroshot", "o"), ("finetuned", "s"))):
        part = table[table["stage"] == stage]
        axes[1, 0].bar(positions + offset, part["heldout_kl"], width=0.3, label=stage)
        error = [part["average_diff"] - part["average_low"], part["average_high"] - part["average_diff"]]
        axes[1, 1].errorbar(positions + offset, part["average_diff"], yerr=error, fmt=marker, capsize=3, label=stage)
    # log: a zero-shot pruned model can sit two orders of magnitude above the fine-tuned variants
    axes[1, 0].set(ylabel="held-out KL to the original", title="KL, zero-shot and after LoRA + KD", yscale="log")
    axes[1, 1].axhline(0, color="grey", lw=0.8)
    axes[1, 1].set(ylabel="task average - original, points (95% CI)", title="task average against the original")
    for ax in axes[1]:
        ax.set_xticks(positions, labels, fontsize=6, rotation=90)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def run_claims(*, folders, out, figure=None, bootstrap: int = 2000, seed: int = 0, level: float = 0.95) -> None:
    """The stage: the paper's claims on several models side by side, from each model's results folder (a run with
    the baselines on): one table (CSV; Markdown with each model's similarity and sensitivity summary) and one
    figure."""
    settings = QualitySettings(bootstrap, seed, level)
    runs = {Path(folder).name: read_run(Path(folder)) for folder in folders}
    table = pd.DataFrame([row for name, run in runs.items() for row in claim_rows(name, run, settings)])
    summary = pd.DataFrame([summary_row(name, run) for name, run in runs.items()])
    write_csv(out, table)
    write_csv(Path(out).with_name(Path(out).stem + "_models.csv"), summary)
    with atomic(Path(out).with_suffix(".md")) as tmp:  # both tables, each model's summary first
        tmp.write_text("\n\n".join(frame.to_markdown(index=False, floatfmt=".4g") for frame in (summary, table)) + "\n")
    if figure:
        claims_figure(runs, table, figure)
