"""The simulator's parameters from measurements, and its validation on this machine.

`fit` estimates a machine's parameters from a `cqil latency` run of the original (its per-layer times, the rest
of a forward, the all-reduce against message size); `graph_fit` a GPU's from the GPU script's CUDA-graph layer
records and compiled decode; `measured_preset` turns those into a preset beside the published ones. `validation`
predicts every measured cqil and tp latency from the fit to the original's alone.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..latency.table import result_setup
from ..models import SHAPES
from .model import HARDWARE, Hardware, latency, layer_params, layer_time, reduction, rest_time

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


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
