"""What CQIL is up against at equal sequential depth: layer pruning (ShortGPT, SLEB) and LP.

    influence = block_influence(model, blocks)           # ShortGPT's BI of every layer (low: removable)
    removed, trace = greedy_removal(model, blocks, 6)     # SLEB: one layer at a time, the least perplexity raised
    run_baselines(settings, model=..., corpus=..., selected="selected.json", out="baselines.json")
    run_comparison(baselines="baselines.json", levels="quality.csv", differences="quality_diff.csv", out=...)

A CQIL plan over [S, E) in groups of P runs (E-S)/P sequential steps where the original runs E-S, on P
GPUs. Removing (E-S)(1-1/P) layers reaches the same depth on one GPU; LP (`plan.py`, mode `lp`) runs the
same groups on the same GPUs but lets every MLP of a group read all of its attention outputs. For every
selected plan the stage names its baselines, each a value (`Prune` or an LP `Plan`) that the later stages
(score, finetune, evaluate, latency) take exactly as they take the plan itself.

Both pruning rules look at the calibration blocks only and never remove a layer that transformers needs
for the cache length (`transform.prunable_layers`: the first layer of each attention type).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import load_split
from .errors import CqilError
from .io import provenance, write_csv, write_json, write_markdown
from .layers import decoder_layers, layer_inputs, lm_logits, run_layers
from .metrics import add_sums, log_probs, summarize, token_sums
from .models import load_config, load_model
from .plan import Plan, Prune, Setup
from .report import comparison_figure
from .runtime import resolve_device
from .transform import apply_plan, planned, prunable_layers

RULES = ("block_influence", "greedy")  # ShortGPT's Block Influence, SLEB's greedy removal


@dataclass(frozen=True)
class BaselinesSettings:
    rules: list = field(default_factory=list)  # pruning rules, of RULES; [] none
    lp: bool = False  # also LP over each matched plan's groups
    match: list = field(default_factory=lambda: ["selected"])  # CQIL plans to match: "selected" = every selected one
    split: str = "calibration"  # corpus blocks the pruning rules look at
    batch_size: int = 4

    def __post_init__(self):
        if unknown := [rule for rule in self.rules if rule not in RULES]:
            raise CqilError(f"baselines.rules: {unknown[0]!r} is not one of {', '.join(RULES)}")
        for name in self.match:
            if name != "selected" and not isinstance(_cqil_plan(name), Plan):
                raise CqilError(f"baselines.match: {name!r} is not a CQIL plan")

    @property
    def active(self) -> bool:
        return bool(self.rules or self.lp)

    def validate(self, num_layers: int) -> None:
        for name in self.match:
            if name != "selected":
                _cqil_plan(name).validate(num_layers)


def _cqil_plan(name: str) -> Plan:
    plan = Plan.parse(name)
    if plan.bypass_mode == "lp":
        raise CqilError(f"baselines.match: {name} is already LP; name the CQIL plan it comes from")
    return plan


def layers_saved(plan: Plan, num_layers: int) -> int:
    """Sequential layer-steps a plan takes out of the model: the layers a pruning baseline removes."""
    return num_layers - plan.steps(num_layers)


@torch.inference_mode()
def block_influence(model, blocks: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """ShortGPT's Block Influence of every layer, BI_i = 1 - mean over tokens of cos(input of i, output of i).

    On the original model; the first token of each block is left out, as in the similarity stage (its
    attention-sink state is an outlier in every layer). float64 sums.
    """
    if blocks.shape[1] < 2:
        raise CqilError(f"block influence: blocks of {blocks.shape[1]} token(s) have nothing after the first token")
    total, count = 0.0, 0
    with planned(model, None):
        for batch in tqdm(blocks.split(batch_size), desc="block influence", unit="batch"):
            inputs, output, _ = layer_inputs(model, batch)
            states = torch.stack([h[:, 1:] for h in [*inputs, output]]).double()  # (L+1, B, T-1, C)
            total = total + F.cosine_similarity(states[:-1], states[1:], dim=-1).sum(dim=(1, 2))
            count += states.shape[1] * states.shape[2]
    return 1 - (total / count).cpu().numpy()


def lowest_influence(influence: np.ndarray, count: int, allowed: list[int]) -> Prune:
    """The `count` allowed layers of lowest Block Influence (ties: the earlier layer)."""
    ranked = sorted(allowed, key=lambda i: (influence[i], i))
    return Prune(tuple(ranked[:count]))


@torch.inference_mode()
def greedy_removal(model, blocks: torch.Tensor, count: int, allowed: list[int], batch_size: int = 4):
    """SLEB's rule: remove one layer at a time, each time the one whose removal raises the perplexity on `blocks`
    least. Returns the Prune and the trace (the layer removed at each step and the perplexity after).

    Each round runs the current pruned model once and keeps the input of every layer, so the candidate i
    only runs layers [i, L) with i removed too (the search's prefix reuse).
    """
    num_layers, removed, trace = len(decoder_layers(model)), (), []
    with planned(model, None):
        for step in tqdm(range(count), desc="greedy removal", unit="layer"):
            candidates = [i for i in allowed if i not in removed]
            totals = {i: {} for i in candidates}
            for batch in blocks.split(batch_size):
                batch = batch.to(next(model.parameters()).device)
                apply_plan(model, Prune(removed) if removed else None)
                inputs, _, kwargs = layer_inputs(model, batch)
                for i in candidates:
                    apply_plan(model, Prune((*removed, i)))
                    hidden = run_layers(model, inputs[i], kwargs, range(i, num_layers))
                    totals[i] = add_sums(totals[i], token_sums(log_probs(lm_logits(model, hidden)), batch))
            scores = {i: summarize(sums)["perplexity"] for i, sums in totals.items()}
            best = min(candidates, key=lambda i: (scores[i], i))
            removed = (*removed, best)
            trace.append({"step": step + 1, "layer": best, "perplexity": scores[best]})
    return Prune(removed), trace


def matched_plans(settings: BaselinesSettings, selected: list[str]) -> list[Plan]:
    """The CQIL plans the baselines match: the selected ones (LP plans among them left out), or those named."""
    named = [name for name in settings.match if name != "selected"]
    if missing := [name for name in named if str(Plan.parse(name)) not in selected]:
        raise CqilError(f"baselines.match: {missing[0]} was not selected (selected: {', '.join(selected)})")
    names = selected if "selected" in settings.match else named
    return [plan for plan in map(Plan.parse, names) if plan.bypass_mode != "lp"]


def run_baselines(
    settings: BaselinesSettings, *, model: str, corpus, selected, out, dtype: str = "auto", device: str = "auto"
) -> None:
    """The stage: for every matched CQIL plan, its equal-depth baselines (`baselines.json`): the layers each pruning
    rule removes from the original, and the LP plan over the same groups, with each rule's evidence (BI per layer,
    the greedy trace)."""
    num_layers = load_config(model).num_hidden_layers
    settings.validate(num_layers)
    plans = matched_plans(settings, json.loads(Path(selected).read_text())["plans"])
    counts = sorted({layers_saved(plan, num_layers) for plan in plans})
    where = resolve_device(device)  # a bad setting fails before any weight is read
    rows, evidence = [], {}
    if settings.rules:
        loaded, _ = load_model(model, dtype=dtype, device=where)
        allowed = prunable_layers(loaded.config)
        if counts and counts[-1] > len(allowed):
            raise CqilError(f"baselines: removing {counts[-1]} layers, but only {len(allowed)} may be removed")
        blocks = load_split(corpus, settings.split)
        chosen = {}
        if "block_influence" in settings.rules:
            influence = block_influence(loaded, blocks, settings.batch_size)
            evidence["block_influence"] = [float(x) for x in influence]
            chosen["block_influence"] = {n: lowest_influence(influence, n, allowed) for n in counts}
        if "greedy" in settings.rules and counts:
            # Greedy removal is nested: the first n layers of the longest run are the rule's answer for n.
            longest, trace = greedy_removal(loaded, blocks, counts[-1], allowed, settings.batch_size)
            evidence["greedy"] = trace
            order = [step["layer"] for step in trace]
            chosen["greedy"] = {n: Prune(tuple(order[:n])) for n in counts}
        for plan in plans:
            n = layers_saved(plan, num_layers)
            rows += [baseline_row(rule, chosen[rule][n], plan, num_layers) for rule in settings.rules]
    if settings.lp:
        rows += [baseline_row("lp", replace(plan, bypass=0, bypass_mode="lp"), plan, num_layers) for plan in plans]
    write_json(
        out,
        {
            "baselines": rows,
            "variants": list(dict.fromkeys(row["variant"] for row in rows)),  # what the later stages run
            "evidence": evidence,
            "split": settings.split,
            "layers": num_layers,
            "provenance": provenance(
                {"model": model, "dtype": dtype, "device": str(where), "settings": asdict(settings)}
            ),
        },
    )


def baseline_row(rule: str, variant: Plan | Prune, plan: Plan, num_layers: int) -> dict:
    return {
        "plan": str(plan),
        "rule": rule,
        "variant": str(variant),
        "steps": variant.steps(num_layers),
        "gpus": variant.size,
    }


# --- The comparison: every method at each depth, zero-shot and fine-tuned ---------------------------------------

METHODS = {"cqil": "CQIL", "lp": "LP", "block_influence": "pruned (ShortGPT BI)", "greedy": "pruned (SLEB greedy)"}


def comparison_rows(record: dict, levels: pd.DataFrame, differences: pd.DataFrame, latency=None) -> pd.DataFrame:
    """One row per (depth, method, stage): the CQIL plans and their baselines (a baseline shared by two plans of the
    same depth counted once), with held-out KL and perplexity, WikiText-2 perplexity and the task average's
    difference from the original with their 95% intervals, the GPUs each needs and, where timed, its latency."""
    layers = record["layers"]
    methods = {}  # (rule, variant) -> (gpus, steps): the CQIL plans first; two rules that agree keep a row each
    for row in record["baselines"]:
        plan = Plan.parse(row["plan"])
        methods.setdefault(("cqil", row["plan"]), (plan.size, plan.steps(layers)))
    for row in record["baselines"]:
        methods.setdefault((row["rule"], row["variant"]), (row["gpus"], row["steps"]))
    level = levels.set_index(["plan", "stage", "task", "metric"])
    diff = differences[differences.task == "average"].set_index(["plan", "stage"])
    timed = _reductions(latency)
    rows = []
    for (rule, variant), (gpus, steps) in methods.items():
        for stage in ("zeroshot", "finetuned"):
            if (variant, stage) not in diff.index:
                continue
            average = diff.loc[(variant, stage)]
            row = {"depth": steps, "method": METHODS[rule], "variant": variant, "gpus": gpus, "stage": stage}
            for metric in ("kl", "perplexity"):
                row[f"heldout_{metric}"] = level["value"].get((variant, stage, "heldout", metric), np.nan)
            wikitext = ("wikitext2", "perplexity")
            if (variant, stage, *wikitext) in level.index:
                found = level.loc[(variant, stage, *wikitext)]
                row |= {"wikitext2_ppl": found["value"], "wikitext2_low": found["low"], "wikitext2_high": found["high"]}
                row["wikitext2_original"] = level["value"].get(("original", "original", *wikitext), np.nan)
            row |= {
                "average_diff": average["diff"],
                "average_low": average["low"],
                "average_high": average["high"],
                "average_distinguishable": bool(average["distinguishable"]),
            }
            rows.append(row | timed.get(variant, {}))
    return pd.DataFrame(rows).sort_values(["depth", "stage"], ascending=[True, False], kind="stable")


def _reductions(latency) -> dict:
    """Measured latency reduction of each timed variant from a latency table (`cqil latency-table`), by phase."""
    if latency is None:
        return {}
    frame = pd.read_csv(latency)
    timed = {}
    for row in frame.itertuples():
        setup = Setup.parse(row.setup)
        if setup.engine in ("cqil", "pruned") and setup.degree == 1:
            label = f"{row.phase}_{row.tokens}" if row.phase == "prefill" else "decode"
            timed.setdefault(str(setup.plan), {})[f"{label}_reduction"] = row.reduction
    return timed


def run_comparison(*, baselines, levels, differences, out, latency_table=None, figure=None) -> None:
    """The stage: CQIL against LP and layer pruning at equal sequential depth, one table (CSV and Markdown) and, with
    `figure`, one figure: quality (held-out KL, perplexities, task average with 95% intervals) zero-shot and
    fine-tuned, the GPUs each needs, and the measured latency where the setup was timed."""
    record = json.loads(Path(baselines).read_text())
    table = comparison_rows(record, pd.read_csv(levels), pd.read_csv(differences), latency_table)
    write_csv(out, table)
    write_markdown(Path(out).with_suffix(".md"), table)
    if figure:
        comparison_figure(table, figure)
