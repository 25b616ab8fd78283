"""Figures (and later tables) built from artifacts only: CSV in, PNG + PDF out.

    cqil figures --similarity similarity.csv --sensitivity sensitivity.csv --search search.csv \
                 --selected selected.json --out-dir figures/
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .io import save_figure

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
    ax.set(xlabel="layer i", ylabel="mean cosine similarity", title=title, ylim=(min(0.5, np.nanmin(np.diagonal(matrix, 1)[1:])) - 0.02, 1.0))
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
        ax.scatter(rows["ideal_reduction"] * 100, rows[metric], marker=MARKERS.get(size, "x"),
                   color=colours[bypass % len(colours)], alpha=0.75, label=f"P={size}, D={bypass}")
    front = pareto(plans, metric).sort_values("ideal_reduction")
    ax.plot(front["ideal_reduction"] * 100, front[metric], "k:", lw=1, label="frontier")
    chosen = plans[plans["plan"].isin(selected)]
    ax.scatter(chosen["ideal_reduction"] * 100, chosen[metric], s=160, facecolors="none", edgecolors="red",
               label="selected")
    for _, row in chosen.iterrows():
        ax.annotate(row["plan"], (row["ideal_reduction"] * 100, row[metric]), fontsize=7, xytext=(5, -10),
                    textcoords="offset points")
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
