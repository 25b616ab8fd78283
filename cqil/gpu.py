"""End-to-end greedy decode on one GPU, eager and compiled, against the bandwidth floor; and the GPU's state.

    cqil decode-latency --model random:llama-7b --device cuda --out decode.json   # scripts/gpu_checks.sh

Decoding one sequence reads every weight once per token, so its floor is weight bytes / HBM bandwidth
(LLaMA-7B in bf16, 13.5 GB, on an H200's 4.8 TB/s: 2.8 ms/token). Eager PyTorch launches each small
kernel from Python and falls far short of it; a static KV cache lets `torch.compile` (mode
"reduce-overhead": the step replayed as a CUDA graph) remove that overhead, as gpt-fast does. Modes:
- `eager`: the dynamic cache, as `generate()` by default;
- `static`: a static cache, still eager (what the cache alone buys);
- `compiled`: the static cache and the decode step compiled (`backend`: inductor on a GPU; `eager` runs
  the same capture through dynamo without generating code, for the CPU dry run).
`fraction` = floor / measured: 1.0 would be the floor.
"""

from __future__ import annotations

import contextlib
import subprocess

import torch

from .decode import MODES, Decoder, check_mode, no_recompiles
from .io import provenance, write_json
from .latency import stats
from .models import load_model

# Peak HBM bandwidth, bytes/s, from the vendors' data sheets, by a substring of torch's device name.
HBM = {"H200": 4.8e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12}


def peak_bandwidth(device) -> tuple[float | None, str | None]:
    """The data-sheet HBM bandwidth of the GPU `device`, and its name; (None, None) on a CPU or an unknown GPU."""
    if torch.device(device).type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return next((bandwidth for key, bandwidth in HBM.items() if key in name), None), name


def gpu_state() -> dict | None:
    """What `nvidia-smi` says of each GPU (clocks, power limit, driver), and torch's CUDA and NCCL versions."""
    if not torch.cuda.is_available():
        return None
    fields = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.limit,power.draw,temperature.gpu"
    try:
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        gpus = [dict(zip(fields.split(","), (v.strip() for v in line.split(",")))) for line in smi.splitlines()]
    except (OSError, subprocess.CalledProcessError) as err:
        gpus = [{"error": str(err)}]
    nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
    return {"gpus": gpus, "cuda": torch.version.cuda, "nccl": ".".join(map(str, nccl)) if nccl else None}


def decode_ms(decoder: Decoder, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Statistics of ms per decoded token (the prefill not counted) over `repeats` greedy generations after `prompt`
    (1, T), after one untimed generation (which compiles a compiled decoder); a recompilation after it is an error."""
    mask = torch.ones_like(prompt)
    sync = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    seconds = []
    for repeat in range(1 + repeats):
        with no_recompiles(decoder) if repeat else contextlib.nullcontext():
            _, clock = decoder.generate(prompt, mask, new_tokens, sync=sync)
        seconds.append((clock[2] - clock[1]) / new_tokens)
    return stats(seconds[1:])


def decode_latency(
    spec: str,
    dtype: str,
    device: str,
    prompt_length: int,
    new_tokens: int,
    modes=MODES,
    backend: str = "inductor",
    repeats: int = 5,
) -> dict:
    """ms/token of greedy decode of `spec` in each mode (`decode_ms`), against the bandwidth floor."""
    for mode in modes:  # a bad mode fails before the model is built
        check_mode(mode, "--modes")
    model, _ = load_model(spec, dtype=dtype, device=device)
    model.to(device)
    prompt = torch.randint(model.config.vocab_size, (1, prompt_length), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth, name = peak_bandwidth(device)
    floor_ms = 1e3 * weights / bandwidth if bandwidth else None
    records = []
    for mode in modes:
        summary = decode_ms(Decoder(model, mode, backend), prompt, new_tokens, repeats)
        records.append(
            {"mode": mode, **summary, "fraction_of_floor": floor_ms / summary["median_ms"] if floor_ms else None}
        )
        torch._dynamo.reset()  # the next mode starts from an uncompiled model
    return {
        "model": spec,
        "dtype": dtype,
        "device": str(device),
        "gpu": name,
        "weight_bytes": weights,
        "peak_bandwidth": bandwidth,
        "floor_ms": floor_ms,
        "prompt_length": prompt_length,
        "new_tokens": new_tokens,
        "backend": backend,
        "records": records,
        "state": gpu_state(),
    }


def run_decode_latency(
    *,
    model: str,
    out,
    dtype: str = "bfloat16",
    device: str = "cuda",
    prompt_length: int = 128,
    new_tokens: int = 64,
    modes=MODES,
    backend: str = "inductor",
    repeats: int = 5,
) -> None:
    """The stage: end-to-end greedy decode in ms/token (eager, static cache, compiled) against the bandwidth floor
    (weight bytes / the GPU's peak HBM bandwidth), with the GPU's state (the GPU script, scripts/gpu_checks.sh)."""
    result = decode_latency(model, dtype, device, prompt_length, new_tokens, tuple(modes), backend, repeats)
    given = {"model": model, "dtype": dtype, "device": device, "prompt_length": prompt_length}
    write_json(out, {**result, "provenance": provenance(given | {"new_tokens": new_tokens, "modes": list(modes)})})
    for record in result["records"]:
        floor = f", {record['fraction_of_floor']:.0%} of the floor" if record["fraction_of_floor"] else ""
        print(f"decode {record['mode']}: {record['median_ms']:.3f} ms/token{floor}")
