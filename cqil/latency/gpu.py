"""What only a GPU shows (the GPU script, scripts/gpu_checks.sh): end-to-end greedy decode, eager and compiled,
against the bandwidth floor; one decoder layer, eager and as a CUDA graph; and the GPU's state.

    cqil decode-latency --model random:llama-7b --device cuda --out decode.json
    cqil layer-latency --shapes llama-7b --device cuda --out layers.json

Decoding one sequence reads every weight once per token, so its floor is weight bytes / HBM bandwidth
(LLaMA-7B in bf16, 13.5 GB, on an H200's 4.8 TB/s: 2.8 ms/token). Eager PyTorch launches each small
kernel from Python and falls far short of it; a static KV cache lets `torch.compile` (mode
"reduce-overhead": the step replayed as a CUDA graph) remove that overhead, as gpt-fast does. Modes:
- `eager`: the dynamic cache, as `generate()` by default;
- `static`: a static cache, still eager (what the cache alone buys);
- `compiled`: the static cache and the decode step compiled (`backend`: inductor on a GPU; `eager` runs
  the same capture through dynamo without generating code, for the CPU dry run).
`fraction` = floor / measured: 1.0 would be the floor.
One decoder layer of a named shape with random weights gives the per-layer time the simulator scales from.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from functools import partial

import pandas as pd
import torch
from transformers import StaticCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from ..decode import MODES, Decoder, check_mode, no_recompiles
from ..errors import EngineError
from ..io import provenance, write_json
from ..layers import with_cache
from ..models import DTYPES, load_model, random_config
from .timing import stats

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


# --- One decoder layer of a named shape --------------------------------------------------------------


def _time(call, warmup: int, repeats: int, sync, graphs: bool) -> list[float]:
    """Seconds per call of `call`; with `graphs`, of the replay of a CUDA graph captured from it."""
    if graphs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the graph, as torch.cuda.graph requires
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        call = graph.replay
    seconds = []
    for _ in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds[warmup:]


@torch.no_grad()
def layer_latency(
    shape: str,
    lengths: list[int],
    context: int,
    dtype: str = "bfloat16",
    device: str = "cuda",
    graphs: bool = False,
    warmup: int = 5,
    repeats: int = 20,
) -> list[dict]:
    """Prefill of T tokens and one decode step over a `context`-token static KV cache, for one decoder
    layer of `random:<shape>` with random weights: the per-layer time the simulator scales from."""
    if graphs and not str(device).startswith("cuda"):
        raise EngineError(f"--graphs needs a CUDA device, got {device!r}")
    config = random_config(f"random:{shape}")
    config.num_hidden_layers, config._attn_implementation = 1, "sdpa"  # one layer: a 33B shape fits any GPU
    torch.manual_seed(0)
    with torch.device(device):  # built in place: no CPU copy of a big layer
        layer = LlamaDecoderLayer(config, layer_idx=0).to(DTYPES[dtype]).eval()
        rotary = LlamaRotaryEmbedding(config)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    records = []
    for tokens in lengths:  # prefill: causal attention over the prompt, no cache
        hidden = torch.randn(1, tokens, config.hidden_size, dtype=DTYPES[dtype], device=device)
        positions = torch.arange(tokens, device=device)[None]
        embeddings = rotary(hidden, positions)
        prefill = partial(layer, hidden, position_embeddings=embeddings, position_ids=positions)
        seconds = _time(prefill, warmup, repeats, sync, graphs)
        records.append({"phase": "prefill", "tokens": tokens, **stats(seconds)})
    cache = StaticCache(config=config, max_cache_len=context + 1)
    hidden = torch.randn(1, 1, config.hidden_size, dtype=DTYPES[dtype], device=device)
    position = torch.tensor([[context]], device=device)
    embeddings, cache_position = rotary(hidden, position), position[0]
    step = partial(
        layer,
        hidden,
        position_embeddings=embeddings,
        position_ids=position,
        use_cache=True,
        cache_position=cache_position,
        **with_cache(cache),
    )
    records.append({"phase": "decode", "tokens": context, **stats(_time(step, warmup, repeats, sync, graphs))})
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    return [
        {
            "shape": shape,
            "dtype": dtype,
            "device": str(device),
            "graphs": graphs,
            "layer_bytes": weights,
            "batch_size": 1,
            **record,
        }
        for record in records
    ]


def run_layer_latency(
    *,
    out,
    shapes=("llama-7b", "llama-13b", "llama-33b"),
    lengths=(128, 512, 2048),
    context: int = 2048,
    dtype: str = "bfloat16",
    device: str = "cuda",
    modes=("eager", "graphs"),
    warmup: int = 5,
    repeats: int = 20,
) -> None:
    """The stage: per-layer prefill and decode latency of named LLaMA shapes with random weights (eager, CUDA
    graphs), as JSON records and a Markdown table on stdout (the GPU script, scripts/gpu_checks.sh)."""
    if unknown := [mode for mode in modes if mode not in ("eager", "graphs")]:
        raise EngineError(f"--modes {unknown[0]!r}: allowed are eager, graphs")
    records = [
        record
        for shape in shapes
        for mode in modes
        for record in layer_latency(
            shape, lengths, context, dtype, device, graphs=mode == "graphs", warmup=warmup, repeats=repeats
        )
    ]
    write_json(
        out,
        {
            "records": records,
            "provenance": provenance(
                {
                    "shapes": shapes,
                    "lengths": lengths,
                    "context": context,
                    "dtype": dtype,
                    "device": device,
                    "modes": modes,
                    "warmup": warmup,
                    "repeats": repeats,
                }
            ),
        },
    )
    columns = ["shape", "graphs", "phase", "tokens", "median_ms", "p10_ms", "p90_ms"]
    print(pd.DataFrame(records)[columns].to_markdown(index=False, floatfmt=".4g"))
