"""Score many plans cheaply on held-out blocks, and select the ones to fine-tune and deploy.

    rows = score_plans(model, blocks, plans)      # perplexity, KL(original || plan), top-1 agreement
    chosen = select(rows, SelectSettings(metric="kl", per_size=1, min_reduction=0.2))

Stages: `run_search` (the grid on the search blocks), `run_select` (the plans carried forward),
`run_score` (one selected plan on the test blocks, which the search never saw).

Reuse: the layers before S compute the same thing for every plan that starts at S, so each batch
runs the original model once, keeps the input of every start layer, and each plan runs only its
layers [S, L) and the head from there. `reuse_prefix=False` scores every plan from the embeddings,
for the benchmark that measures what the reuse saves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .data import load_split
from .errors import CqilError
from .io import provenance, write_csv, write_json
from .layers import decoder_inputs, decoder_layers, layer_inputs, lm_logits, run_layers
from .metrics import add_sums, log_probs, summarize, token_sums
from .models import load_config, load_model
from .plan import Plan, Prune
from .runtime import resolve_device
from .transform import apply_plan, planned

METRICS = {"kl": "min", "perplexity": "min", "top1": "max"}  # what "better" means for each metric


@dataclass(frozen=True)
class SearchSettings:
    split: str = "search"  # corpus blocks the plans are scored on
    starts: list = field(default_factory=lambda: [8, 10, 12, 14, 16, 18, 20])  # S values of the grid
    ends: list = field(default_factory=lambda: [26, 28])  # E values (exclusive)
    sizes: list = field(default_factory=lambda: [2, 4])  # P values
    bypasses: list = field(default_factory=lambda: [0, 1])  # D values
    modes: list = field(default_factory=lambda: ["paper"])  # bypass modes for D >= 1
    include: list = field(default_factory=lambda: ["S18-E28-P2-D0"])  # extra plans by name, scored whatever the grid
    batch_size: int = 4  # blocks per forward

    def plans(self, num_layers: int) -> list[Plan]:
        extra = [Plan.parse(name).validate(num_layers) for name in self.include]
        grid = Plan.grid(num_layers, self.starts, self.ends, self.sizes, self.bypasses, self.modes)
        return sorted(set(grid + extra))


@dataclass(frozen=True)
class SelectSettings:
    metric: str = "kl"  # kl | perplexity | top1: ranks the plans of each P
    per_size: int = 1  # plans kept for each P
    min_reduction: float = 0.2  # only plans whose ideal latency reduction is at least this
    bypasses: list = field(default_factory=lambda: [0])  # D values eligible (the official README advises D=0)
    always: list = field(default_factory=list)  # plans selected whatever their score (e.g. the paper's)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise CqilError(f"select.metric: {self.metric!r} is not one of {', '.join(METRICS)}")


@dataclass(frozen=True)
class ScoreSettings:
    split: str = "test"  # blocks the search never saw
    batch_size: int = 4


@torch.inference_mode()
def score_plans(
    model,
    blocks: torch.Tensor,
    plans: list[Plan],
    batch_size: int = 4,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> list[dict]:
    """One row per plan (and one for the original): quality against the original on `blocks`."""
    num_layers = len(decoder_layers(model))
    totals = {plan: {} for plan in [None, *plans]}
    bar = tqdm(total=len(blocks) * len(plans), desc="search", unit="plan-block", disable=not progress)
    with planned(model, None):  # whatever plan the model had is restored at the end
        for batch in blocks.split(batch_size):
            batch = batch.to(next(model.parameters()).device)
            for plan, sums in _plan_sums(model, batch, plans, reuse_prefix):
                totals[plan] = add_sums(totals[plan], sums)
                bar.update(len(batch) if plan else 0)
    bar.close()
    original = summarize(totals[None])["perplexity"]
    return [
        plan_row(plan, num_layers) | summarize(sums) | {"ppl_ratio": summarize(sums)["perplexity"] / original}
        for plan, sums in totals.items()
    ]


def _plan_sums(model, batch: torch.Tensor, plans: list[Plan], reuse_prefix: bool):
    """Yield (plan, token sums) for the original (None) and each plan on one batch."""
    num_layers = len(decoder_layers(model))
    apply_plan(model, None)
    inputs, output, kwargs = layer_inputs(model, batch)  # the original, once per batch
    reference = log_probs(lm_logits(model, output))  # shared by every plan
    yield None, token_sums(reference, batch, reference)
    for plan in plans:
        apply_plan(model, plan)
        if reuse_prefix:
            hidden = run_layers(model, inputs[plan.start], kwargs, range(plan.start, num_layers))
        else:
            hidden, kwargs = decoder_inputs(model, batch)
            hidden = run_layers(model, hidden, kwargs, range(num_layers))
        yield plan, token_sums(log_probs(lm_logits(model, hidden)), batch, reference)


def plan_row(plan: Plan | Prune | None, num_layers: int) -> dict:
    """The plan's identity and ideal latency, as table columns."""
    if plan is None:
        return {
            "plan": "original",
            "start": None,
            "end": None,
            "size": 1,
            "bypass": 0,
            "bypass_mode": None,
            "steps": num_layers,
            "ideal_reduction": 0.0,
        }
    return {
        "plan": str(plan),
        "start": plan.start,
        "end": plan.end,
        "size": plan.size,
        "bypass": plan.bypass,
        "bypass_mode": plan.bypass_mode,
        "steps": plan.steps(num_layers),
        "ideal_reduction": plan.ideal_reduction(num_layers),
    }


def select(rows: list[dict], settings: SelectSettings) -> list[str]:
    """The plans to carry forward: for each P, the `per_size` best by `metric` among the plans with
    an ideal reduction of at least `min_reduction` and an eligible D; then the `always` plans."""
    sign = 1 if METRICS[settings.metric] == "min" else -1
    eligible = [
        r
        for r in rows
        if r["plan"] != "original"
        and r["bypass"] in settings.bypasses
        and r["ideal_reduction"] >= settings.min_reduction - 1e-9
    ]  # CSV round-trips lose the last digits
    chosen = []
    for size in sorted({r["size"] for r in eligible}):
        ranked = sorted(
            (r for r in eligible if r["size"] == size), key=lambda r: (sign * r[settings.metric], r["plan"])
        )
        chosen += [r["plan"] for r in ranked[: settings.per_size]]
    return chosen + [str(Plan.parse(p)) for p in settings.always if str(Plan.parse(p)) not in chosen]


def run_search(settings: SearchSettings, *, model: str, corpus, out, dtype: str = "auto", device: str = "auto") -> None:
    """The stage: score the plan grid (a CSV row per plan); the JSON beside it has the throughput."""
    plans = settings.plans(load_config(model).num_hidden_layers)  # a bad plan fails before the weights load
    blocks = load_split(corpus, settings.split)
    where = resolve_device(device)
    loaded, _ = load_model(model, dtype=dtype, device=where)
    start = time.perf_counter()
    rows = score_plans(loaded, blocks, plans, batch_size=settings.batch_size)
    seconds = time.perf_counter() - start
    write_csv(out, pd.DataFrame(rows))
    write_json(
        Path(out).with_suffix(".json"),
        {
            "plans": len(plans),
            "blocks": len(blocks),
            "seconds": seconds,
            "plans_per_minute": 60 * len(plans) / seconds,
            "provenance": provenance(
                {"model": model, "dtype": dtype, "device": str(where), "settings": asdict(settings)}
            ),
        },
    )


def run_select(settings: SelectSettings, *, search, out) -> None:
    """The stage: the plans to carry forward from a search CSV, by the rule in the settings."""
    chosen = select(pd.read_csv(search).to_dict("records"), settings)
    if not chosen:
        raise CqilError(f"select: no plan of {search} passes the rule {asdict(settings)}")
    write_json(
        out, {"plans": chosen, "rule": asdict(settings), "provenance": provenance({"settings": asdict(settings)})}
    )


def run_score(
    settings: ScoreSettings, *, model: str, plan: Plan | Prune, corpus, out, dtype: str = "auto", device: str = "auto"
) -> None:
    """The stage: perplexity, KL to the original and top-1 agreement of one plan on the test blocks (JSON)."""
    blocks = load_split(corpus, settings.split)
    where = resolve_device(device)
    loaded, _ = load_model(model, dtype=dtype, device=where)
    original, row = score_plans(loaded, blocks, [plan], batch_size=settings.batch_size, progress=False)
    write_json(
        out,
        {
            "split": settings.split,
            "plan": row,
            "original": original,
            "provenance": provenance(
                {"model": model, "dtype": dtype, "device": str(where), "settings": asdict(settings)}, plan
            ),
        },
    )


def run_scores_table(inputs, *, out) -> None:
    """The stage: the selected plans' `cqil score` files as one CSV (`selected_scores.csv`), the original first."""
    records = [json.loads(Path(path).read_text()) for path in inputs]
    write_csv(out, pd.DataFrame([records[0]["original"]] + [record["plan"] for record in records]))
