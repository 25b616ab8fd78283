"""The stage `cqil simulate`: the paper's models on GPU presets, the CQIL/TP crossover, and the validation.

Predictions for each named shape's plans on each hardware preset (original, CQIL, TP and CQIL x TP), the
decode latency as the small all-reduce slows down (the crossover figure), and, from this machine's `cqil latency`
runs, the model fitted and checked against what was measured (fit.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CqilError
from ..io import provenance, write_csv, write_json, write_markdown
from ..latency.contention import contended, describe
from ..models import SHAPES
from ..plan import Plan, Setup
from ..report import simulation_figures
from .fit import fit_runs, measured_preset, preset_errors, validation
from .model import HARDWARE, PAPER, US, Hardware, crossover, latency, reduction, shape_of


def predictions(
    plans: dict[str, list[str]], hardware: list[Hardware], degrees: list[int], prefill: list[int], max_ranks: int = 8
) -> list[dict]:
    """Original, CQIL, TP and CQIL x TP (up to `max_ranks` ranks) for each named shape and hardware preset."""
    rows = []
    for name, names in plans.items():
        shape, layers = shape_of(name), SHAPES[name]["num_hidden_layers"]
        setups = (
            [(None, 1)]
            + [(Plan.parse(p), 1) for p in names]
            + [(None, n) for n in degrees]
            + [(Plan.parse(p), n) for p in names for n in degrees if Plan.parse(p).size * n <= max_ranks]
        )
        for hw in hardware:
            for phase, tokens in [("decode", 1)] + [("prefill", t) for t in prefill]:
                for plan, tp in setups:
                    rows.append(
                        {
                            "shape": name,
                            "hardware": hw.name,
                            "phase": phase,
                            "tokens": tokens,
                            "setup": str(Setup.of(plan, tp)),
                            "ranks": Setup.of(plan, tp).ranks,
                            "ms": 1e3 * latency(shape, hw, phase, tokens, plan, tp),
                            "reduction": reduction(shape, hw, phase, tokens, plan, tp),
                            "ideal": Setup.of(plan, tp).ideal(layers),
                            "paper": PAPER.get((name, str(plan))) if tp == 1 and phase == "decode" else None,
                            "crossover_us": 1e6 * crossover(shape, hw, plan, phase, tokens)
                            if plan and tp == 1
                            else None,
                        }
                    )
    return rows


@dataclass(frozen=True)
class SimulateSettings:
    plans: dict = field(
        default_factory=lambda: {  # shape (cqil.models.SHAPES) -> plans, 0-indexed, end exclusive
            "llama-7b": ["S12-E30-P2-D0", "S12-E30-P2-D1", "S14-E30-P4-D0"],  # the official plans (paper: 26.2%, 37.4%)
            "llama-13b": ["S15-E37-P2-D0", "S17-E37-P4-D0"],  # illustrative
            "llama-33b": ["S18-E58-P2-D0", "S18-E58-P4-D0"],  # P4 over 40 layers: our guess at the 48.3% plan
            "llama-70b": ["S24-E76-P2-D0", "S24-E76-P4-D0"],  # illustrative
            "qwen1.5-14b": ["S17-E37-P2-D0"],
        }
    )  # the official Qwen plan
    hardware: list = field(
        default_factory=lambda: ["A100-80GB/nccl", "A100-80GB/oneshot", "H100-SXM/nccl", "H100-SXM/oneshot"]
    )  # presets; the first draws the crossover
    tp_degrees: list = field(default_factory=lambda: [2, 4, 8])
    prefill_tokens: list = field(default_factory=lambda: [512, 2048])
    max_ranks: int = 8  # CQIL x TP setups up to this many ranks

    def __post_init__(self):
        for name, plans in self.plans.items():
            if name not in SHAPES:
                raise CqilError(f"simulate.plans: unknown shape {name!r}; allowed are {', '.join(SHAPES)}")
            for plan in plans:
                try:
                    Plan.parse(plan).validate(SHAPES[name]["num_hidden_layers"])
                except CqilError as err:
                    raise CqilError(f"simulate.plans.{name}: {err}") from None
        for name in self.hardware:
            if name not in HARDWARE:
                raise CqilError(f"simulate.hardware: unknown preset {name!r}; allowed are {', '.join(HARDWARE)}")


SWEEP_US = tuple(np.geomspace(1, 200, 25))  # small all-reduce latencies the crossover figure spans


def crossover_sweep(settings: SimulateSettings, latencies_us=SWEEP_US) -> list[dict]:
    """Decode latency of the first shape's D0 plans, TP and CQIL x TP as the small all-reduce latency varies,
    on the first hardware preset: where each setup wins."""
    name = next(iter(settings.plans))
    plans = [p for p in settings.plans[name] if Plan.parse(p).bypass == 0]
    setups = (
        [(None, 1)]
        + [(p, 1) for p in plans]
        + [(None, n) for n in settings.tp_degrees]
        + [(p, n) for p in plans for n in settings.tp_degrees if Plan.parse(p).size * n <= settings.max_ranks]
    )
    return sweep(name, HARDWARE[settings.hardware[0]], setups, latencies_us)


def sweep(name: str, hw: Hardware, setups: list[tuple[str | None, int]], latencies_us) -> list[dict]:
    """Decode latency of each (plan, tp) setup as the small all-reduce latency varies."""
    shape = shape_of(name)
    return [
        {
            "shape": name,
            "hardware": hw.name,
            "setup": str(Setup.of(plan and Plan.parse(plan), tp)),
            "ranks": Setup.of(plan and Plan.parse(plan), tp).ranks,
            "allreduce_us": a,
            "ms": 1e3
            * latency(
                shape,
                replace(hw, allreduce_latency=a * US, allreduce_per_doubling=0),
                "decode",
                plan=plan and Plan.parse(plan),
                tp=tp,
            ),
        }
        for plan, tp in setups
        for a in latencies_us
    ]


def run_simulate(
    settings: SimulateSettings, *, out_dir, latency=(), gpu_latency=(), gpu_layers=(), gpu_decode=()
) -> None:
    """The stage: predictions for the paper's models on GPU presets, the CQIL/TP crossover, and validation of the
    model fitted on this machine's `cqil latency` runs, as CSV and Markdown tables, a JSON summary and figures.
    With the GPU script's records (`gpu_latency`: an original's `cqil latency` on one GPU; `gpu_layers`: `cqil
    layer-latency`; `gpu_decode`: `cqil decode-latency`), a preset fitted to that GPU joins the predictions, and
    every preset's per-layer times are checked against the measured ones (gpu_presets.csv)."""
    out = Path(out_dir)
    layers = [record for path in gpu_layers for record in json.loads(Path(path).read_text())["records"]]
    decode = next((json.loads(Path(path).read_text()) for path in gpu_decode), None)
    measured = [measured_preset(json.loads(Path(path).read_text()), layers, decode) for path in gpu_latency]
    presets = [HARDWARE[name] for name in settings.hardware] + measured
    predicted = pd.DataFrame(
        predictions(
            settings.plans,
            presets,
            list(settings.tp_degrees),
            list(settings.prefill_tokens),
            settings.max_ranks,
        )
    )
    by_model = {}
    for path in latency:
        result = json.loads(Path(path).read_text())
        if contended(result):  # a busy machine's times would fit the machine's other work
            print(
                f"cqil: warning: {path}: left out of the fit and the validation, measured on a busy machine "
                f"({describe(result['load'])})"
            )
            continue
        by_model.setdefault(result["model"], []).append(result)
    by_model = {model: group for model, group in by_model.items() if any(r["engine"] == "original" for r in group)}
    checked = pd.DataFrame([row for group in by_model.values() for row in validation(group)])
    swept = pd.DataFrame(crossover_sweep(settings))
    tables = [("predictions", predicted), ("validation", checked), ("crossover", swept)]
    if gpu_layers:
        tables.append(("gpu_presets", pd.DataFrame(preset_errors(layers, [*HARDWARE.values(), *measured]))))
    for name, frame in tables:
        write_csv(out / f"{name}.csv", frame)
        write_markdown(out / f"{name}.md", frame)
    write_json(
        out / "simulation.json",
        {
            "hardware": {hw.name: asdict(hw) for hw in [*HARDWARE.values(), *measured]},
            "fitted": {model: asdict(fit_runs(group)) for model, group in by_model.items()},
            "provenance": provenance(
                {
                    "latency": list(latency),
                    "gpu_latency": list(gpu_latency),
                    "gpu_layers": list(gpu_layers),
                    "gpu_decode": list(gpu_decode),
                    "settings": asdict(settings),
                }
            ),
        },
    )
    simulation_figures(predicted, checked, swept, out)
