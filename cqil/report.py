"""Figures built from artifacts only: CSV/JSON in, PNG + PDF out (`cqil figures`, and each stage's own figure).

    cqil figures --similarity similarity.csv --sensitivity sensitivity.csv --search search.csv \
                 --selected selected.json --out-dir figures/

Every figure of the pipeline is drawn here, for the stage that writes it (the latency table's, the simulator's,
the quality trade-off, the baselines' comparison, the fine-tuning loss); the tables are cqil/tables.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .io import save_figure
from .plan import Setup

MARKERS = {2: "o", 3: "s", 4: "^", 5: "D", 6: "v", 8: "P"}


def similarity_matrix(frame: pd.DataFrame) -> np.ndarray:
    size = int(frame["layer_i"].max()) + 1
    matrix = np.full((size, size), np.nan)
    matrix[frame["layer_i"], frame["layer_j"]] = frame["cosine"]
    return matrix


def similarity_heatmap(frame: pd.DataFrame, title: str, path) -> None:
    matrix = similarity_matrix(frame)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    image = ax.imshow(matrix, cmap="viridis", vmin=max(0.0, np.nanmin(matrix)), vmax=1, origin="upper")
    fig.colorbar(image, ax=ax, label="mean cosine similarity of layer inputs")
    ax.set(xlabel="layer j (input)", ylabel="layer i (input)", title=title)
    save_figure(fig, path)


def similarity_curve(frame: pd.DataFrame, title: str, path) -> None:
    """cos(h_i, h_{i+1}) and cos(h_i, h_{i+2}): how alike the inputs of nearby layers are, by depth."""
    matrix = similarity_matrix(frame)
    layers = np.arange(len(matrix))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k, style in ((1, "-o"), (2, "--s")):
        ax.plot(layers[k:], np.diagonal(matrix, k), style, ms=3, label=f"cos(input of layer i-{k}, input of layer i)")
    ax.set(
        xlabel="layer i",
        ylabel="mean cosine similarity",
        title=title,
        ylim=(min(0.5, np.nanmin(np.diagonal(matrix, 1)[1:])) - 0.02, 1.0),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    save_figure(fig, path)


def sensitivity_figure(frame: pd.DataFrame, title: str, path) -> None:
    """KL to the original when layer i computes from the input of layer i-k: low = quasi-independent."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k, rows in frame[frame["layer"] >= 0].groupby("distance"):
        ax.semilogy(rows["layer"], rows["kl"], "-o", ms=3, label=f"layer i on the input of layer i-{k}")
    ax.set(xlabel="layer i", ylabel="KL(original || changed), nats/token", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def pareto(frame: pd.DataFrame, metric: str = "kl") -> pd.DataFrame:
    """Plans no other plan beats on both ideal reduction (higher) and `metric` (lower)."""
    ordered = frame.sort_values(["ideal_reduction", metric], ascending=[False, True])
    return ordered[ordered[metric] < ordered[metric].cummin().shift(fill_value=np.inf)]


def frontier_figure(frame: pd.DataFrame, selected: list[str], title: str, path, metric: str = "kl") -> None:
    """Quality vs ideal latency reduction, one marker shape per P and one colour per D."""
    plans = frame[frame["plan"] != "original"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (size, bypass), rows in plans.groupby(["size", "bypass"]):
        ax.scatter(
            rows["ideal_reduction"] * 100,
            rows[metric],
            marker=MARKERS.get(size, "x"),
            color=colours[bypass % len(colours)],
            alpha=0.75,
            label=f"P={size}, D={bypass}",
        )
    front = pareto(plans, metric).sort_values("ideal_reduction")
    ax.plot(front["ideal_reduction"] * 100, front[metric], "k:", lw=1, label="frontier")
    chosen = plans[plans["plan"].isin(selected)]
    ax.scatter(
        chosen["ideal_reduction"] * 100, chosen[metric], s=160, facecolors="none", edgecolors="red", label="selected"
    )
    for _, row in chosen.iterrows():
        ax.annotate(
            row["plan"],
            (row["ideal_reduction"] * 100, row[metric]),
            fontsize=7,
            xytext=(5, -10),
            textcoords="offset points",
        )
    ax.set_yscale("log")
    labels = {"kl": "KL(original || plan), nats/token", "perplexity": "perplexity", "top1": "top-1 agreement"}
    ax.set(xlabel="ideal latency reduction (%)", ylabel=labels.get(metric, metric), title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def loss_figure(frame: pd.DataFrame, title: str, path) -> None:
    """Training loss per optimizer step, with a running mean to see the trend through the noise."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(frame["step"], frame["loss"], alpha=0.35, label="loss per step")
    window = max(1, len(frame) // 10)
    ax.plot(frame["step"], frame["loss"].rolling(window, min_periods=1).mean(), label=f"running mean ({window})")
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


FLOOR = -60  # % reduction: slower setups are drawn down to here, with their value written on the bar


def latency_figure(frame: pd.DataFrame, results: list[dict], title: str, path) -> None:
    """Left: measured reduction of each setup against the 1-thread original, with its ideal. Right: all-reduce
    time against message size, beside the time of one decoder layer (what a group all-reduce must stay below)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    shown = frame[~((frame.engine == "original") & (frame.threads == 1))]
    setups, kinds = list(dict.fromkeys(shown.setup)), list(dict.fromkeys(zip(shown.phase, shown.tokens)))
    width = 0.8 / max(len(kinds), 1)
    for k, (phase, tokens) in enumerate(kinds):
        part = shown[(shown.phase == phase) & (shown.tokens == tokens)].set_index("setup").reindex(setups)
        label = f"prefill {tokens} tokens" if phase == "prefill" else f"decode (context {tokens})"
        x, height = np.arange(len(setups)) + (k - (len(kinds) - 1) / 2) * width, 100 * part.reduction.to_numpy()
        left.bar(x, np.maximum(height, FLOOR), width, label=label)
        for xi, hi in zip(x, height):  # a bar cut at the floor says how far it goes
            if hi < FLOOR:
                left.text(xi, FLOOR, f"{hi:.0f}%", rotation=90, ha="center", va="bottom", fontsize=7, color="white")
    ideals = shown.groupby("setup", sort=False).ideal.first().reindex(setups)
    left.hlines(
        100 * ideals,
        np.arange(len(setups)) - 0.45,
        np.arange(len(setups)) + 0.45,
        colors="black",
        linestyles="dashed",
        label="ideal",
    )
    left.axhline(0, color="grey", linewidth=0.8)
    if 100 * shown.reduction.min() < FLOOR:
        left.set_ylim(bottom=FLOOR - 5)
    left.set_xticks(np.arange(len(setups)), setups, rotation=15, ha="right")
    left.set(ylabel="latency reduction vs 1-thread original (%)", title=title)
    left.legend(fontsize=8, loc="lower left")
    allreduce = pd.DataFrame([dict(r, setup=f"{r['ranks']} ranks") for result in results for r in result["allreduce"]])
    if len(allreduce):
        allreduce = allreduce.drop_duplicates("bytes").sort_values("bytes")
        right.errorbar(
            allreduce.bytes,
            allreduce.median_ms,
            yerr=[allreduce.median_ms - allreduce.p10_ms, allreduce.p90_ms - allreduce.median_ms],
            marker="o",
            capsize=3,
            label=f"all-reduce, {allreduce.ranks.iloc[0]} ranks (median, p10-p90)",
        )
    parts = [p for result in results for p in result["parts"] if p["threads"] == 1]
    for part, color in zip(parts, plt.cm.tab10.colors[2:]):
        right.axhline(
            part["prefill_layer_ms"],
            color=color,
            linestyle="dotted",
            label=f"one layer, prefill {part['tokens']} tokens",
        )
    if parts:
        right.axhline(parts[0]["decode_layer_ms"], color="black", linestyle="dotted", label="one layer, decode")
    right.set(
        xscale="log",
        yscale="log",
        xlabel="message size (bytes)",
        ylabel="time (ms)",
        title="all-reduce vs one decoder layer",
    )
    right.legend(fontsize=8)
    save_figure(fig, path)


def simulation_figures(predicted: pd.DataFrame, checked: pd.DataFrame, swept: pd.DataFrame, out) -> None:
    """The simulator's three figures in `out`: predicted CQIL reduction against P per model and hardware; CQIL vs
    TP vs CQIL x TP as the all-reduce slows down; predictions against this machine's measurements."""
    reduction_figure(predicted, Path(out) / "simulation_reduction")
    crossover_figure(swept, Path(out) / "simulation_crossover")
    validation_figure(checked, Path(out) / "simulation_validation")


def reduction_figure(predicted: pd.DataFrame, path) -> None:
    """Predicted decode reduction of each CQIL plan (D0, no TP) against P, per model and hardware, with the ideal
    and the paper's numbers."""
    setups = predicted.setup.map(Setup.parse)
    plain_d0 = setups.map(lambda setup: setup.engine == "cqil" and setup.degree == 1 and setup.plan.bypass == 0)
    decode = predicted[(predicted.phase == "decode") & plain_d0]
    hardware = list(dict.fromkeys(decode.hardware))
    fig, axes = plt.subplots(1, len(hardware), figsize=(3.6 * len(hardware), 3.6), sharey=True, squeeze=False)
    for ax, hw in zip(axes[0], hardware):
        for (shape, part), color in zip(
            decode[decode.hardware == hw].groupby("shape", sort=False), plt.cm.tab10.colors
        ):
            ax.plot(part.ranks, 100 * part.reduction, marker="o", color=color, label=shape)
            ax.plot(part.ranks, 100 * part.ideal, linestyle="dashed", color=color, alpha=0.6)
            known = part[part.paper.notna()]
            ax.scatter(
                known.ranks,
                100 * known.paper.astype(float),
                marker="*",
                s=120,
                color=color,
                edgecolor="black",
                zorder=3,
            )
        ax.set(title=hw, xlabel="P (layers per group = GPUs)", xticks=sorted(decode.ranks.unique()))
    axes[0][0].set_ylabel("decode latency reduction (%)")
    axes[0][0].legend(fontsize=7, title="solid: predicted, dashed: ideal, *: paper", title_fontsize=7)
    save_figure(fig, path)


def crossover_figure(swept: pd.DataFrame, path) -> None:
    """Predicted decode latency of CQIL, TP and CQIL x TP as the small all-reduce's latency grows (up to 4 GPUs, 8)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, small in zip(axes, (True, False)):
        part = swept[(swept.ranks <= 4) == small]
        for setup, line in part.groupby("setup", sort=False):
            gpus = line.ranks.iloc[0]
            ax.plot(
                line.allreduce_us,
                line.ms,
                label=f"{setup} ({gpus} GPU{'s' if gpus > 1 else ''})",
                linestyle="dashed" if Setup.parse(setup).engine == "tp" else "solid",
            )
        ax.set(
            xscale="log",
            xlabel="small all-reduce latency (us)",
            title=f"{swept['shape'].iloc[0]}, {'up to 4' if small else '8'} GPUs, {swept.hardware.iloc[0]}",
        )
        ax.legend(fontsize=7)
    axes[0].set_ylabel("decode latency (ms/token, predicted)")
    save_figure(fig, path)


def validation_figure(checked: pd.DataFrame, path) -> None:
    """The simulator's predictions against this machine's measurements: fitted on the original, predicted else."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    if checked.empty:  # no `cqil latency` run of this machine to check against (none, or all on a busy machine)
        ax.text(0.5, 0.5, "no uncontended latency run\nof this machine to validate on", ha="center", va="center")
        ax.set_axis_off()
        save_figure(fig, path)
        return
    for setup, part in checked.groupby("setup", sort=False):
        ax.scatter(part.measured_ms, part.predicted_ms, label=setup, marker="o" if part.fitted_on.all() else "^")
    values = checked[["measured_ms", "predicted_ms"]].to_numpy()
    limits = [values.min() * 0.8, values.max() * 1.2]
    ax.plot(limits, limits, color="grey", linewidth=0.8)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="measured (ms)",
        ylabel="predicted (ms)",
        title="this machine: fitted on the original (o), predicted (^)",
    )
    ax.legend(fontsize=7)
    save_figure(fig, path)


def tradeoff_figure(diffs: pd.DataFrame, path) -> None:
    """The paper's trade-off: each plan's accuracy difference from the original (the mean over the above-chance
    tasks, with its 95% interval) against its ideal latency reduction, zero-shot and fine-tuned."""
    average = diffs[diffs.task == "average"]
    fig, ax = plt.subplots(figsize=(8, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = [(plan, stage) for plan in average.plan.unique() for stage in ("zeroshot", "finetuned")]
    dodge = {key: 0.4 * (i - (len(series) - 1) / 2) for i, key in enumerate(series)}  # plans often share a reduction
    for (plan, part), colour in zip(average.groupby("plan", sort=False), colours):
        for stage, marker, fill in (("zeroshot", "o", "none"), ("finetuned", "s", colour)):
            row = part[part.stage == stage]
            if len(row):
                x, y = 100 * row.ideal_reduction.iloc[0] + dodge[(plan, stage)], row["diff"].iloc[0]
                ax.errorbar(
                    x,
                    y,
                    yerr=[[y - row.low.iloc[0]], [row.high.iloc[0] - y]],
                    marker=marker,
                    color=colour,
                    markerfacecolor=fill,
                    capsize=4,
                    linestyle="none",
                    label=f"{plan}, {stage.replace('shot', '-shot')}",
                )
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(
        xlabel="ideal latency reduction (%; points side by side where plans share one)",
        ylabel="accuracy difference from the original (points)",
        title="quality against latency (mean over the above-chance tasks, 95% intervals)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the intervals fill the plot
    save_figure(fig, path)


def comparison_figure(table: pd.DataFrame, path) -> None:
    """CQIL against LP and layer pruning at equal depth: a row per method (with the GPUs it needs), grouped by depth;
    left the task average's difference from the original, right WikiText-2 perplexity, both with 95% intervals,
    zero-shot (open) and fine-tuned (filled)."""
    methods = list(dict.fromkeys(zip(table.depth, table.method, table.variant, table.gpus)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.55 * len(methods) + 1.6), sharey=True)
    for y, (_, method, variant, _) in enumerate(methods):
        for stage, offset, fill in (("zeroshot", 0.15, "none"), ("finetuned", -0.15, None)):
            row = table[(table.method == method) & (table.variant == variant) & (table.stage == stage)]
            if not len(row):
                continue
            row, colour = row.iloc[0], "C0" if method == "CQIL" else "C1" if method == "LP" else "C3"
            for ax, value, low, high in (
                (left, "average_diff", "average_low", "average_high"),
                (right, "wikitext2_ppl", "wikitext2_low", "wikitext2_high"),
            ):
                if value in row and not pd.isna(row[value]):
                    ax.errorbar(
                        row[value],
                        y + offset,
                        xerr=[[row[value] - row[low]], [row[high] - row[value]]],
                        marker="o" if stage == "zeroshot" else "s",
                        color=colour,
                        markerfacecolor=fill or colour,
                        capsize=3,
                        linestyle="none",
                        label=stage.replace("shot", "-shot") if y == 0 and ax is left else None,
                    )
    labels = [
        f"{method}  {variant}\n{gpus} GPU{'s' if gpus > 1 else ''}, depth {depth}"
        for depth, method, variant, gpus in methods
    ]
    left.set_yticks(range(len(methods)), labels, fontsize=8)
    left.invert_yaxis()
    left.axvline(0, color="grey", linewidth=0.8)
    left.set(xlabel="task average: difference from the original (points)")
    if "wikitext2_original" in table and table.wikitext2_original.notna().any():
        right.axvline(table.wikitext2_original.dropna().iloc[0], color="grey", linestyle="dashed", label="original")
    right.set(xlabel="WikiText-2 perplexity", xscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="x")
    left.legend(fontsize=8, loc="lower left")
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle("CQIL, LP and layer pruning at equal sequential depth (95% intervals)", fontsize=10)
    save_figure(fig, path)


# --- Stages -------------------------------------------------------------------------------------------


def run_figures(*, similarity, sensitivity, search, selected, out_dir, title: str = "") -> None:
    """The stage: similarity, sensitivity and search-frontier figures (PNG + PDF) from the stage tables."""
    out, frame = Path(out_dir), pd.read_csv(similarity)
    similarity_heatmap(frame, f"{title}: layer-input similarity", out / "similarity_heatmap")
    similarity_curve(frame, f"{title}: adjacent layers", out / "similarity_adjacent")
    sensitivity_figure(pd.read_csv(sensitivity), f"{title}: sensitivity to an earlier input", out / "sensitivity")
    chosen = json.loads(Path(selected).read_text())
    frontier_figure(
        pd.read_csv(search), chosen["plans"], f"{title}: plan search", out / "frontier", metric=chosen["rule"]["metric"]
    )
