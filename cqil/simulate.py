"""Analytic latency of the original model, CQIL, TP and CQIL x TP, for hardware we do not have.

    hw = HARDWARE["A100-80GB/nccl"]
    latency(SHAPES["llama-7b"], hw, "decode", plan=Plan.parse("S12-E30-P2-D0"))   # seconds per token

The model, batch 1 (docs/gpu.md compares it with an H200):
- one layer: its weight bytes over the memory bandwidth (decode) or its FLOPs over the compute rate
  (prefill of T tokens: 2·params·T + 2·T²·d for causal attention), plus a fixed cost per layer;
- an all-reduce of m bytes over n ranks: a latency that grows with log2(n), plus m·2(n-1)/n over the
  bus bandwidth;
- the rest of a forward (embedding, final norm, the head on one position, sampling): the head's weight
  bytes over the bandwidth plus a fixed cost.
CQIL runs the layers outside [S, E) as usual and each group as one layer plus one all-reduce (and one
all-gather for bypass D >= 1), as `runtime/cqil.py` does with replicated placement. TP(n) splits every
layer and the head n ways with two all-reduces per layer (gpt-fast's scheme). CQIL x TP splits each
layer over n ranks and sums each group across its P layers with one more all-reduce (not fused).
`fit` estimates the parameters of the machine that ran `cqil latency` from that run's own records.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CqilError
from .io import provenance, write_csv, write_json, write_markdown
from .latency.contention import contended, describe
from .latency.table import result_setup
from .models import SHAPES
from .plan import Plan, Setup
from .report import simulation_figures

US = 1e-6


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # bytes/s: effective rate of streaming weights from memory
    flops: float  # FLOP/s: effective dense compute (prefill)
    layer_fixed: float  # s per layer and forward: kernel launches, small kernels
    rest_fixed: float  # s per forward outside the layers, beyond reading the head's weights
    allreduce_latency: float  # s: a small all-reduce over 2 ranks ...
    allreduce_per_doubling: float  # s: ... and how much more each doubling of the ranks costs
    bus_bandwidth: float  # bytes/s: large all-reduce messages
    source: str = ""


# Presets (performance.md, tables 1b, 1c and 3.3): A100 calibrated against gpt-fast's TP numbers,
# H100 estimated (about +-20%). "nccl" is NCCL as PyTorch calls it in a CUDA-graph decode loop;
# "oneshot" a custom one-shot all-reduce (gpt-fast ENABLE_INTRA_NODE_COMM, vLLM, TRT-LLM).
_A100 = dict(flops=208e12, layer_fixed=42 * US, rest_fixed=420 * US, bus_bandwidth=210e9)  # rest: t_o 0.57 ms for 7B
_H100 = dict(flops=600e12, layer_fixed=30 * US, rest_fixed=300 * US, bus_bandwidth=370e9)
HARDWARE = {
    hw.name: hw
    for hw in [
        Hardware(
            "A100-80GB/nccl",
            1.70e12,
            **_A100,
            allreduce_latency=32 * US,
            allreduce_per_doubling=9 * US,
            source="gpt-fast Llama-2-7B TP 1/2/4/8 (plain NCCL), fitted; nccl-tests #123",
        ),
        Hardware(
            "A100-80GB/oneshot",
            1.70e12,
            **_A100,
            allreduce_latency=10 * US,
            allreduce_per_doubling=0,
            source="gpt-fast with ENABLE_INTRA_NODE_COMM, fitted; pytorch PR 114001",
        ),
        Hardware(
            "A100-40GB/nccl",
            1.35e12,
            **_A100,
            allreduce_latency=32 * US,
            allreduce_per_doubling=9 * US,
            source="A100-80GB/nccl with 1555 GB/s peak HBM (about 87% sustained)",
        ),
        Hardware(
            "H100-SXM/nccl",
            2.90e12,
            **_H100,
            allreduce_latency=12 * US,
            allreduce_per_doubling=5 * US,
            source="estimated: 87% of 3.35 TB/s; NCCL NVLS with CUDA graphs (nccl #1259)",
        ),
        Hardware(
            "H100-SXM/oneshot",
            2.90e12,
            **_H100,
            allreduce_latency=5 * US,
            allreduce_per_doubling=1.5 * US,
            source="estimated: custom all-reduce 3.7-5.9 us (sglang PR 2904)",
        ),
    ]
}

# What others measured, to compare predictions with (ms per token or fraction).
PAPER = {
    ("llama-7b", "S12-E30-P2-D0"): 0.262,
    ("llama-7b", "S14-E30-P4-D0"): 0.374,
    ("llama-33b", "S18-E58-P4-D0"): 0.483,
}  # the paper's Table 3; the 33B plan is inferred: P4 over 40 layers
GPT_FAST = {
    "A100-80GB/nccl": {1: 9.53, 2: 7.34, 4: 5.93, 8: 5.58},  # Llama-2-7B, ms/token (README)
    "A100-80GB/oneshot": {1: 9.53, 2: 5.92, 4: 3.94, 8: 3.05},
}


def layer_params(shape: dict) -> int:
    d, f = shape["hidden_size"], shape["intermediate_size"]
    d_kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return 2 * d * d + 2 * d * d_kv + 3 * d * f  # q, o; k, v; gate, up, down


def layer_time(shape: dict, hw: Hardware, phase: str, tokens: int, split: int = 1, dtype_bytes: int = 2) -> float:
    """One decoder layer split over `split` ranks; prefill is bound by compute or by bytes, whichever is slower."""
    params = layer_params(shape) / split
    streaming = params * dtype_bytes / hw.bandwidth
    if phase == "decode":
        return streaming + hw.layer_fixed
    compute = (2 * params * tokens + 2 * tokens**2 * shape["hidden_size"] / split) / hw.flops
    return max(compute, streaming) + hw.layer_fixed


def allreduce_time(hw: Hardware, ranks: int, nbytes: float) -> float:
    if ranks <= 1:
        return 0.0
    return (
        hw.allreduce_latency
        + hw.allreduce_per_doubling * (math.log2(ranks) - 1)
        + nbytes * 2 * (ranks - 1) / ranks / hw.bus_bandwidth
    )


def rest_time(shape: dict, hw: Hardware, split: int = 1, dtype_bytes: int = 2) -> float:
    """Everything outside the layers (the head's weights for one position, embedding, sampling), split as gpt-fast's TP
    does."""
    return (shape["hidden_size"] * shape["vocab_size"] * dtype_bytes / hw.bandwidth + hw.rest_fixed) / split


def latency(
    shape: dict, hw: Hardware, phase: str, tokens: int = 1, plan: Plan | None = None, tp: int = 1, dtype_bytes: int = 2
) -> float:
    """Seconds for one prefill of `tokens` tokens, or one decode step, of the original (plan None, tp 1),
    CQIL (plan), TP (tp) or CQIL x TP (both) on P x tp ranks."""
    message = (tokens if phase == "prefill" else 1) * shape["hidden_size"] * dtype_bytes
    layer = layer_time(shape, hw, phase, tokens, tp, dtype_bytes) + 2 * allreduce_time(hw, tp, message)
    rest, layers = rest_time(shape, hw, tp, dtype_bytes), shape["num_hidden_layers"]
    if plan is None or plan.size == 1:
        return layers * layer + rest
    grouped, groups = plan.end - plan.start, (plan.end - plan.start) // plan.size
    two = plan.bypass or plan.bypass_mode == "lp"  # bypass all-gathers the attention outputs first, LP all-reduces them
    combine = allreduce_time(hw, plan.size, message) * (2 if two else 1)
    return (layers - grouped) * layer + groups * (layer + combine) + rest


def reduction(
    shape: dict, hw: Hardware, phase: str, tokens: int = 1, plan: Plan | None = None, tp: int = 1, dtype_bytes: int = 2
) -> float:
    """1 - latency / latency of the original on one device."""
    return 1 - (
        latency(shape, hw, phase, tokens, plan, tp, dtype_bytes)
        / latency(shape, hw, phase, tokens, dtype_bytes=dtype_bytes)
    )


def crossover(shape: dict, hw: Hardware, plan: Plan, phase: str = "decode", tokens: int = 1) -> float:
    """The small all-reduce latency (s) above which CQIL on P ranks beats TP on the same P ranks."""

    def gap(a):  # CQIL minus TP: linear in the all-reduce latency
        flat = replace(hw, allreduce_latency=a, allreduce_per_doubling=0)
        return latency(shape, flat, phase, tokens, plan=plan) - latency(shape, flat, phase, tokens, tp=plan.size)

    slope = (gap(1e-3) - gap(0.0)) / 1e-3
    return -gap(0.0) / slope


def fit(result: dict, allreduce: list[dict]) -> Hardware:
    """This machine's parameters from an original run's 1-thread `parts` and all-reduce times vs size.

    Prefill layer time against FLOPs gives the compute rate (slope) and the fixed cost per layer
    (intercept); the decode layer time minus that fixed cost gives the bandwidth; the decode rest minus
    the head's bytes gives the rest's fixed cost; the all-reduce times give latency and bus bandwidth.
    """
    shape, dtype_bytes = result["shape"], DTYPE_BYTES[result["dtype"]]
    parts = [p for p in result["parts"] if p["threads"] == 1]
    work = [2 * layer_params(shape) * p["tokens"] + 2 * p["tokens"] ** 2 * shape["hidden_size"] for p in parts]
    slope, fixed = (
        np.polyfit(work, [p["prefill_layer_ms"] / 1e3 for p in parts], 1)
        if len(parts) > 1
        else (parts[0]["prefill_layer_ms"] / 1e3 / work[0], 0.0)
    )
    if slope <= 0:  # times that do not grow with the work (noise on tiny shapes): a rate through the origin
        slope, fixed = float(np.median([p["prefill_layer_ms"] / 1e3 / w for p, w in zip(parts, work)])), 0.0
    fixed = max(float(fixed), 0.0)
    decode = np.median([p["decode_layer_ms"] for p in parts]) / 1e3
    bandwidth = layer_params(shape) * dtype_bytes / max(decode - fixed, 1e-9)
    head = shape["hidden_size"] * shape["vocab_size"] * dtype_bytes / bandwidth
    rest = max(float(np.median([p["decode_rest_ms"] for p in parts])) / 1e3 - head, 0.0)
    sizes = np.array([r["bytes"] for r in allreduce], dtype=float)
    times = np.array([r["median_ms"] for r in allreduce]) / 1e3
    if not allreduce:  # one device: no all-reduce was timed (measured_preset takes published figures)
        per_byte, base = float("inf"), float("nan")
    else:
        per_byte, base = np.polyfit(sizes, times, 1) if len(allreduce) > 1 else (0.0, times[0])
    return Hardware(
        f"fitted: {result['model']}",
        bandwidth,
        1 / slope,
        fixed,
        rest,
        max(float(base), 0.0),
        0.0,
        1 / max(float(per_byte), 1e-15),
        source="fitted to this machine's `cqil latency` records",
    )


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def graph_fit(layers: list[dict], decode: dict | None) -> dict:
    """Bandwidth, compute rate and fixed costs of a GPU from `cqil layer-latency`'s CUDA-graph records, and the
    rest outside the layers from `cqil decode-latency`'s compiled decode: what a graph-replayed decode loop
    costs. (Eager per-layer times on a GPU are mostly Python launching kernels: a fit to them is a fit to that.)

    Decode layer time against weight bytes over the shapes gives the bandwidth (slope) and the fixed cost per
    layer (intercept); the longest prefill, less that fixed cost, gives the compute rate."""
    graphs = [r for r in layers if r["graphs"]]
    steps = [r for r in graphs if r["phase"] == "decode"]
    nbytes = [layer_params(SHAPES[r["shape"]]) * DTYPE_BYTES[r["dtype"]] for r in steps]
    seconds = [r["median_ms"] / 1e3 for r in steps]
    per_byte, fixed = np.polyfit(nbytes, seconds, 1) if len(set(nbytes)) > 1 else (seconds[0] / nbytes[0], 0.0)
    fixed = max(float(fixed), 0.0)
    longest = max(r["tokens"] for r in graphs if r["phase"] == "prefill")
    flops = float(
        np.median(
            [
                (2 * layer_params(SHAPES[r["shape"]]) + 2 * longest * SHAPES[r["shape"]]["hidden_size"])
                * longest
                / max(r["median_ms"] / 1e3 - fixed, 1e-9)
                for r in graphs
                if r["phase"] == "prefill" and r["tokens"] == longest
            ]
        )
    )
    found = {"bandwidth": 1 / float(per_byte), "flops": flops, "layer_fixed": fixed, "rest_fixed": 0.0}
    compiled = next((r for r in (decode or {}).get("records", []) if r["mode"] == "compiled"), None)
    if compiled:  # the whole compiled step less its layers and the head's bytes, as this fit predicts them
        shape = SHAPES[decode["model"].removeprefix("random:")]
        hw = Hardware("fit", found["bandwidth"], flops, fixed, 0.0, 0.0, 0.0, 1.0)
        predicted = shape["num_hidden_layers"] * layer_time(shape, hw, "decode", 1) + rest_time(shape, hw)
        found["rest_fixed"] = max(compiled["median_ms"] / 1e3 - predicted, 0.0)
    return found


def measured_preset(
    result: dict, layers: list[dict] = (), decode: dict | None = None, links: str = "H100-SXM/nccl"
) -> Hardware:
    """A preset for the GPU that ran the GPU script (scripts/gpu_checks.sh): from its CUDA-graph layer records and
    compiled decode where there are some (`graph_fit`), else fitted to `cqil latency --engine original`'s per-layer
    and non-layer times; the all-reduce, which one GPU cannot measure, from the published figures of `links` (an
    H200 has the H100's NVLink 4)."""
    gpu = (result.get("provenance", {}).get("machine") or {}).get("gpu") or result.get("device", "GPU")
    name = next((key for key in ("H200", "H100", "A100") if key in gpu), gpu)
    wire = HARDWARE[links]
    if any(r["graphs"] for r in layers):
        fitted = replace(fit(result, []), **graph_fit(layers, decode))
        how = "CUDA-graph layer times (`cqil layer-latency`)" + (
            " and the compiled decode's rest (`cqil decode-latency`)" if decode else ""
        )
    else:
        fitted, how = fit(result, []), f"`cqil latency` ({result['model']}, {result['dtype']})"
    return replace(
        fitted,
        name=f"{name}/measured",
        allreduce_latency=wire.allreduce_latency,
        allreduce_per_doubling=wire.allreduce_per_doubling,
        bus_bandwidth=wire.bus_bandwidth,
        source=f"bandwidth, flops, layer and rest fixed costs fitted to {how} on one {gpu}; "
        f"all-reduce from {links}: {wire.source}",
    )


def preset_errors(layer_records: list[dict], presets: list[Hardware]) -> list[dict]:
    """Each preset's predicted time of one decoder layer against what `cqil layer-latency` measured on a GPU
    (CUDA-graph records where there are some: the presets assume a graph-replayed decode loop). The presets do
    not model reading the KV cache, which a decode step over a long context adds."""
    graphs = [r for r in layer_records if r["graphs"]] or layer_records
    return [
        {
            "hardware": hw.name,
            "shape": record["shape"],
            "phase": record["phase"],
            "tokens": record["tokens"],
            "measured_ms": record["median_ms"],
            "predicted_ms": predicted,
            "error": predicted / record["median_ms"] - 1,
        }
        for hw in presets
        for record in graphs
        for predicted in [
            1e3
            * layer_time(
                SHAPES[record["shape"]],
                hw,
                record["phase"],
                1 if record["phase"] == "decode" else record["tokens"],
                dtype_bytes=DTYPE_BYTES[record["dtype"]],
            )
        ]
    ]


def shape_of(name: str) -> dict:
    return {**SHAPES[name], "name": name}


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


def fit_runs(results: list[dict]) -> Hardware:
    """`fit` on the runs of one model: the original's parts, the first all-reduce timings."""
    original = next(r for r in results if r["engine"] == "original")
    return fit(original, next((r["allreduce"] for r in results if r["allreduce"]), []))


def validation(results: list[dict]) -> list[dict]:
    """Fit this machine on the original's parts and the all-reduce times, then predict every cqil and tp
    latency that was measured (held out from the fit): predicted against measured, and the reductions."""
    original, hw = next(r for r in results if r["engine"] == "original"), fit_runs(results)
    dtype_bytes, rows = DTYPE_BYTES[original["dtype"]], []
    base = {(r["phase"], r["tokens"]): r["median_ms"] for r in original["records"] if r["threads"] == 1}
    for result in results:
        setup = result_setup(result)
        plan, tp = setup.plan, setup.degree
        for record in (r for r in result["records"] if r["threads"] == 1):
            args = (original["shape"], hw, record["phase"], record["tokens"])
            baseline = record.get("baseline_median_ms", base[(record["phase"], record["tokens"])])
            predicted = 1e3 * latency(*args, plan, tp, dtype_bytes)
            rows.append(
                {
                    "model": result["model"],
                    "setup": str(setup),
                    "phase": record["phase"],
                    "tokens": record["tokens"],
                    "measured_ms": record["median_ms"],
                    "predicted_ms": predicted,
                    "error": predicted / record["median_ms"] - 1,
                    "fitted_on": result["engine"] == "original",
                    "measured_reduction": 1 - record["median_ms"] / baseline,
                    "predicted_reduction": reduction(*args, plan, tp, dtype_bytes),
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
