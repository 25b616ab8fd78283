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
fit.py estimates the parameters of the machine that ran `cqil latency` from that run's own records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..models import SHAPES
from ..plan import Plan

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


def shape_of(name: str) -> dict:
    return {**SHAPES[name], "name": name}
