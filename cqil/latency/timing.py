"""The timed loops of a `cqil latency` run: a generation per repeat, where its time goes, the all-reduce.

One repeat is a greedy generation: a prefill of the prompt (logits of its last position only, as
`generate()` does), then `new_tokens` decode steps with the KV cache. Warm-up repeats are dropped;
each record holds the median, p10 and p90 over the repeats, on rank 0's clock after a barrier.
The original engine also records where the time goes (per-layer time, the rest: embedding, final
norm, head, sampling); an engine on several ranks records all-reduce time against message size. The
simulator is calibrated from these parts.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from tqdm import tqdm

from ..decode import Decoder, no_recompiles
from ..layers import decoder_layers
from ..plan import Setup
from .contention import Window, own_seconds
from .settings import LatencySettings


def prompts(vocab: int, batch: int, length: int, seed: int, pad: int = 0):
    """Random token ids (B, T) and their attention mask; the first row is left-padded by `pad` tokens."""
    ids = torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def stats(seconds) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "samples_ms": [round(float(x), 4) for x in ms],
    }


def time_generation(
    decoder: Decoder, ranks, settings: LatencySettings, length: int, sync, progress, baseline=None, interleaved=False
) -> list[dict]:
    """Prefill and per-token decode latency for one prompt length.

    With `interleaved`, rank 0 also times the 1-rank `baseline` (the original model's decoder) after each
    repeat of the engine while the other ranks wait, so engine and baseline share one run and one machine state.
    The first generation of each compiles a compiled step; a recompilation in a timed repeat is an error.
    """
    ids, mask = prompts(decoder.model.config.vocab_size, settings.batch_size, length, settings.seed)
    ids, mask = ids.to(ranks.device), mask.to(ranks.device)
    seconds = {"": ([], []), "baseline_": ([], [])}  # (prefill, decode per token) of the engine and the baseline
    compiling = int(decoder.mode == "compiled")  # a first generation that compiles, neither warm-up nor timed
    for repeat in range(compiling + settings.warmup + settings.repeats):
        for prefix, timed in [("", decoder), ("baseline_", baseline)][: 2 if interleaved else 1]:
            ranks.barrier()
            if timed is None:  # a rank > 0 while rank 0 times the baseline
                continue
            with no_recompiles(timed) if repeat >= compiling else contextlib.nullcontext():
                _, clock = timed.generate(ids, mask, settings.new_tokens, sync=sync)
            if repeat >= compiling + settings.warmup:
                seconds[prefix][0].append(clock[1] - clock[0])
                seconds[prefix][1].append((clock[2] - clock[1]) / max(settings.new_tokens, 1))
        if repeat >= compiling:
            progress.update()
    shape = {"tokens": length, "batch_size": settings.batch_size, "new_tokens": settings.new_tokens}
    return [
        {
            "phase": phase,
            **shape,
            **{
                f"{prefix}{key}": value
                for prefix, times in seconds.items()
                if times[i]
                for key, value in stats(times[i]).items()
            },
        }
        for i, phase in enumerate(("prefill", "decode"))
    ]


def time_engine(
    decoder: Decoder, setup: Setup, settings: LatencySettings, ranks, sync, job_cores: list[int], baseline=None
) -> tuple[list[dict], list[dict], dict]:
    """The timed repeats of every thread count and prompt length (`time_generation`), where the original's time
    goes (`time_parts`), and the machine's load over them: every rank's CPU time against the job's cores'."""
    original = setup.engine == "original"
    interleaved = not original and settings.interleaved_baseline  # rank 0 times `baseline`, the others wait
    threads = settings.baseline_threads if original else [settings.threads_per_rank]
    records, parts = [], []
    total = len(threads) * len(settings.prompt_lengths) * (settings.warmup + settings.repeats)
    ranks.barrier()
    window, cpu = Window.start(job_cores), own_seconds()
    with tqdm(total=total, desc=f"latency {setup.engine}", disable=ranks.rank != 0) as progress:
        for count in threads:
            if ranks.device.type == "cpu":
                torch.set_num_threads(count)
            for length in settings.prompt_lengths:
                found = time_generation(decoder, ranks, settings, length, sync, progress, baseline, interleaved)
                records += [{"threads": count, **record} for record in found]
                if original and decoder.mode == "eager":  # hooks around every layer: an eager model only
                    parts.append({"threads": count, **time_parts(decoder.model, settings, length, ranks.device, sync)})
    load = window.stop(ranks.total(own_seconds() - cpu), settings.contention_limit)  # every rank's CPU time
    return records, parts, load


@torch.no_grad()
def time_parts(model, settings: LatencySettings, length: int, device, sync) -> dict:
    """Where one generation's time goes: decoder layers (timed by hooks) and the rest, per phase."""
    layers = decoder_layers(model)
    spans, start = [], {}

    def before(module, args):
        sync()
        start["t"] = time.perf_counter()

    def after(module, args, output):
        sync()
        spans.append(time.perf_counter() - start["t"])

    hooks = [
        h for layer in layers for h in (layer.register_forward_pre_hook(before), layer.register_forward_hook(after))
    ]
    try:
        ids, mask = prompts(model.config.vocab_size, settings.batch_size, length, settings.seed)
        _, clock = Decoder(model).generate(ids.to(device), mask.to(device), settings.new_tokens, sync=sync)
    finally:
        for hook in hooks:
            hook.remove()
    steps, count = max(settings.new_tokens, 1), len(layers)
    prefill_layers, decode_layers = sum(spans[:count]), sum(spans[count:]) / steps
    return {
        "tokens": length,
        "batch_size": settings.batch_size,
        "layers": count,
        "prefill_layer_ms": 1e3 * prefill_layers / count,
        "prefill_rest_ms": 1e3 * (clock[1] - clock[0] - prefill_layers),
        "decode_layer_ms": 1e3 * decode_layers / count,
        "decode_rest_ms": 1e3 * ((clock[2] - clock[1]) / steps - decode_layers),
    }


def time_allreduce(ranks, settings: LatencySettings, hidden: int, dtype, sync) -> list[dict]:
    """All-reduce latency over this process group against message size (batch x tokens x hidden)."""
    records = []
    for tokens in settings.allreduce_tokens:
        message = torch.randn(settings.batch_size, tokens, hidden, dtype=dtype, device=ranks.device)
        seconds = []
        for _ in range(5 + settings.allreduce_repeats):  # 5 warm-up calls: gloo sets up its buffers
            ranks.barrier()
            sync()
            start = time.perf_counter()
            torch.distributed.all_reduce(message)
            sync()
            seconds.append(time.perf_counter() - start)
        records.append(
            {
                "tokens": tokens,
                "bytes": message.numel() * message.element_size(),
                "ranks": ranks.world,
                **stats(seconds[5:]),
            }
        )
    return records


SLOWDOWN = "CQIL_TEST_SLOWDOWN"  # a test hook: engines other than the original take this fraction longer


def slow_down(model, fraction: float) -> None:
    """Every forward of `model` sleeps `fraction` of its own time after it (what `SLOWDOWN` asks for): a real,
    slower engine for the tests of `cqil track`, without changing the engine's code."""
    start = {}
    model.register_forward_pre_hook(lambda module, args: start.update(t=time.perf_counter()))
    model.register_forward_hook(lambda module, args, out: time.sleep(fraction * (time.perf_counter() - start["t"])))
