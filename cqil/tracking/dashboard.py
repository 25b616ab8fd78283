"""`cqil track dashboard`: the history as one static HTML page, readable offline and as a CI artifact.

Per tracked metric, a trend over the records: each record's value, its band (the record's interval where it has
one, else the p10-p90 of its repeats), contended records as hollow markers (left out of the change points), and
the change points found in the series (`verdict.change_points`, binary segmentation with a permutation test) as
vertical lines. A table below gives every record's provenance (its number on the charts' x-axis, date, git sha,
label, machine, config). The charts are inline SVG drawn by matplotlib: no scripts, no network.
"""

from __future__ import annotations

import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .verdict import change_points

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
.charts{display:flex;flex-wrap:wrap;gap:8px}.chart{width:440px}.chart svg{width:100%;height:auto}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"""


def band(entry: dict, name: str) -> tuple[float, float] | None:
    """The record's interval of a metric, else the p10-p90 of its repeats, else None."""
    if interval := entry.get("intervals", {}).get(name):
        return tuple(interval)
    samples = entry.get("samples", {}).get(name)
    return tuple(np.percentile(samples, [10, 90])) if samples and len(samples) > 1 else None


def series(records: list[dict], name: str) -> dict:
    """One metric across the records that have it: x (record numbers), values, bands, contended flags."""
    held = [(i, r) for i, r in enumerate(records) if name in r["metrics"]]
    return {
        "x": np.array([i for i, _ in held]),
        "value": np.array([r["metrics"][name] for _, r in held], dtype=float),
        "band": [band(r, name) for _, r in held],
        "contended": np.array([name in r.get("contended", ()) for _, r in held], dtype=bool),
    }


def chart(name: str, line: dict, points: list[int], better: str) -> str:
    """One metric's trend as an SVG string."""
    fig, ax = plt.subplots(figsize=(5.5, 2.6))
    with_band = [(x, b) for x, b in zip(line["x"], line["band"]) if b]
    if with_band:
        xs, bands = zip(*with_band)
        ax.fill_between(xs, [b[0] for b in bands], [b[1] for b in bands], alpha=0.25, color="C0", lw=0)
    quiet = ~line["contended"]
    ax.plot(line["x"][quiet], line["value"][quiet], "o-", color="C0", ms=4)
    ax.plot(line["x"][~quiet], line["value"][~quiet], "o", mfc="none", color="C3", ms=5, label="contended")
    for x in points:
        ax.axvline(x - 0.5, color="C1", ls="--", lw=1)
    ax.set_title(f"{name} ({better} is better)", fontsize=7)
    ax.set_xlabel("record", fontsize=7)
    ax.tick_params(labelsize=7)
    if (~quiet).any():
        ax.legend(fontsize=6)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    return "<svg" + buffer.getvalue().split("<svg", 1)[1]  # no XML prolog inside the page


def page(records: list[dict], rules: dict, title: str = "cqil benchmark history") -> tuple[str, int]:
    """The dashboard's HTML and its number of charts; `rules`: metric name -> Rule (the tracked metrics)."""
    charts = []
    for name in sorted(rules):
        line = series(records, name)
        quiet = ~line["contended"]
        found = change_points(line["value"][quiet]) if quiet.sum() >= 6 else []
        points = [int(line["x"][quiet][i]) for i in found]
        moved = f" &middot; change at record {', '.join(map(str, points))}" if points else ""
        charts.append(
            f'<div class="chart" data-metric="{html.escape(name)}">{chart(name, line, points, rules[name].direction)}'
            f"<small>{len(line['x'])} records{moved}</small></div>"
        )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(value))}</td>"
            for value in (
                i,
                r.get("date"),
                str(r.get("git", ""))[:10] + ("-dirty" if r.get("dirty") else ""),
                r.get("label") or "",
                (r.get("machine") or {}).get("cpu"),
                (r.get("machine") or {}).get("cores"),
                r.get("config"),
                str(r.get("config_hash", ""))[:8],
                len(r.get("contended", ())),
            )
        )
        + "</tr>"
        for i, r in enumerate(records)
    )
    head = "".join(
        f"<th>{h}</th>" for h in ("record", "date", "git", "label", "cpu", "cores", "config", "hash", "contended")
    )
    text = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(records)} records, {len(charts)} metrics. Bands: the record's interval, or the p10-p90 of its "
        "repeats. Hollow red: measured on a busy machine, left out. Dashed: a change point (binary segmentation, "
        "permutation test at 99%).</p>"
        f"<div class='charts'>{''.join(charts)}</div><h2>Records</h2><table><tr>{head}</tr>{rows}</table>"
        "</body></html>"
    )
    return text, len(charts)
