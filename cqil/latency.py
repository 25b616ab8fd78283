"""Latency of the original model (1 rank), CQIL (P ranks), tensor parallelism (n ranks) and a pruned model (1 rank).

    cqil latency --model smollm2-135m --engine cqil --plan S12-E28-P2-D0 --out cqil.json
    cqil latency --model smollm2-135m --engine pruned --plan drop-17-19-20-22-23-25 --out pruned.json
    cqil latency-table cqil.json original.json --out latency.csv --figure latency

One repeat is a greedy generation: a prefill of the prompt (logits of its last position only, as
`generate()` does), then `new_tokens` decode steps with the KV cache. Warm-up repeats are dropped;
each record holds the median, p10 and p90 over the repeats, on rank 0's clock after a barrier.
On CPU each rank of a multi-rank engine is bound to its own cores (`runtime.pin`).
In the same run a check compares the engine's logits with a single-process reference under teacher
forcing (both fed the reference's greedy tokens): cqil against the simulation of its plan
(`transform.py`), tp against the original model. A padded batch exercises the masks. A pruned model is
that single-process transform itself, so it has no check (its equivalence is tested in tests/test_transform.py).

The original engine also records where the time goes (per-layer time, the rest: embedding, final
norm, head, sampling); the cqil engine records all-reduce time against message size. The simulator
is calibrated from these parts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import StaticCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from . import runtime
from .contention import Window, contended, describe, own_seconds
from .decode import MODES, Decoder, no_recompiles
from .errors import EngineError
from .io import provenance, write_csv, write_json, write_markdown
from .layers import decoder_layers, with_cache
from .models import DTYPES, load_config, load_model, random_config
from .plan import ENGINES, Plan, Prune, Setup, parse_plan
from .report import latency_figure
from .runtime import cqil, tp
from .transform import apply_plan, check_prune, planned

SHAPE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)  # what the simulator needs to know of the model


@dataclass(frozen=True)
class LatencySettings:
    prompt_lengths: list[int] = field(default_factory=lambda: [512])
    new_tokens: int = 16  # decode steps after each prefill
    batch_size: int = 1
    warmup: int = 1  # repeats dropped before timing
    repeats: int = 5
    baseline_threads: list[int] = field(default_factory=lambda: [1, 2])  # CPU threads of the 1-rank original
    threads_per_rank: int = 1  # CPU threads of each cqil / tp rank
    check_batch_size: int = 2  # the correctness check: a padded batch, teacher-forced decode steps
    check_length: int = 32
    check_new_tokens: int = 8
    allreduce_tokens: list[int] = field(default_factory=lambda: [1, 16, 128, 512])  # message = batch x tokens x hidden
    allreduce_repeats: int = 30
    placement: str = "replicated"  # cqil: layers outside the groups on every rank, or on rank 0 only ("rank0")
    interleaved_baseline: bool = True  # cqil / tp: rank 0 also times the original between repeats (a copy in memory)
    seed: int = 0
    timeout: float = 300.0  # seconds a rank waits in a collective before the run fails
    contention_limit: float = 0.1  # share of the job's cores' time other processes may take (cqil/contention.py)
    mode: str = "eager"  # decode: eager, static (cache) or compiled (static cache, torch.compile; cqil/decode.py)
    backend: str = "inductor"  # torch.compile backend of the compiled mode ("eager": dynamo without code generation)
    share_gpu: bool = False  # several ranks on one GPU (gloo): a check of the CUDA path, never a timing for the tables

    def __post_init__(self):  # checked before any process starts, and by check_config before any job
        if self.mode not in MODES:
            raise EngineError(f"latency.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.placement not in cqil.PLACEMENTS:
            raise EngineError(f"latency.placement: {self.placement!r} is not one of {', '.join(cqil.PLACEMENTS)}")


@dataclass(frozen=True)
class Job:
    """What one `cqil latency` run times, checked whole before any process starts (`Job.check`): the model (its
    spec and config) and the setup. The ranks and the engines take it as it is; what they still check needs the
    live run (the process group's size, the logits)."""

    spec: str  # the model as the command line names it
    setup: Setup
    config: Any  # the model's transformers config, read without its weights

    @classmethod
    def check(cls, spec: str, engine: str, plan: Plan | Prune | None, degree: int | None) -> Job:
        """The job the command line asks for (`--model`, `--engine`, `--plan`, `--degree`), or a one-line error:
        the setup, and its plan or degree against the model's config."""
        if engine not in ENGINES:
            raise EngineError(f"engine {engine!r}: allowed are {', '.join(ENGINES)}")
        if engine == "cqil" and not isinstance(plan, Plan):
            raise EngineError("engine cqil needs a plan (--plan S12-E28-P2-D0)")
        if engine == "pruned" and not isinstance(plan, Prune):
            raise EngineError("engine pruned needs the removed layers (--plan drop-17-19-20)")
        if engine == "tp" and not degree:
            raise EngineError("engine tp needs a degree (--degree 2)")
        setup = Setup(engine, plan if engine in ("cqil", "pruned") else None, degree if engine == "tp" else 1)
        config = load_config(spec)
        if setup.plan:
            setup.plan.validate(config.num_hidden_layers)
        if setup.engine == "pruned":
            check_prune(config, setup.plan)
        if setup.engine == "tp":
            tp.check_degree(config, setup.degree)
        return cls(spec, setup, config)


def result_setup(result: dict, threads: int | None = None) -> Setup:
    """The setup a `cqil latency` result timed; `threads` tells the original's thread counts apart."""
    plan = parse_plan(result["plan"]) if result["plan"] else None
    return Setup(result["engine"], plan, result["degree"] or 1, threads if result["engine"] == "original" else None)


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


def reference_run(model, settings: LatencySettings, device):
    """The check's padded batch and the reference logits and greedy tokens on it: the model run eagerly."""
    ids, mask = prompts(
        model.config.vocab_size,
        settings.check_batch_size,
        settings.check_length,
        settings.seed + 1,
        pad=settings.check_length // 4 if settings.check_batch_size > 1 else 0,
    )
    ids, mask = ids.to(device), mask.to(device)
    logits, _ = Decoder(model).generate(ids, mask, settings.check_new_tokens, keep=0)
    forced = torch.stack([step[:, -1].argmax(-1) for step in logits[:-1]], dim=1)
    return ids, mask, forced, logits


def compare(decoder: Decoder, reference) -> dict:
    """Max |logit difference| and argmax agreement of an engine (its decoder) against the reference, teacher-forced."""
    ids, mask, forced, expected = reference
    logits, _ = decoder.generate(ids, mask, forced.shape[1], keep=0, forced=forced)
    real = mask.bool()  # prefill positions that are tokens, not padding
    pairs = [(logits[0][real], expected[0][real])] + [(a[:, -1], b[:, -1]) for a, b in zip(logits[1:], expected[1:])]
    got, want = torch.cat([a for a, _ in pairs]).double(), torch.cat([b for _, b in pairs]).double()
    return {
        "max_abs_diff": float((got - want).abs().max()),
        "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).double().mean()),
        "reference_max_abs": float(want.abs().max()),
        "positions": len(got),
        "batch_size": len(ids),
        "decode_steps": forced.shape[1],
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


# What the check allows between an engine's logits and its single-process reference, by dtype:
# (absolute, relative to the largest |reference logit|). Both sides run the same weights in the same
# dtype, so only the order of the additions differs (the all-reduce, TP's split matmuls). float32: 1e-4
# absolute, the tests' tolerance. bfloat16 and float16 keep 8 and 11 significant bits, and that drift
# grows with width and depth: TP's row-parallel partial sums are rounded before they are added. The
# bf16 limit is set from TP 2 at LLaMA-7B width on a GPU, the widest drift seen (docs/gpu.md has the
# measured drifts); a broken engine misses by far more (the plan itself, an
# unfilled cache slot).
CHECK_TOLERANCE = {"float64": (1e-8, 0.0), "float32": (1e-4, 0.0), "bfloat16": (0.0, 0.10), "float16": (0.0, 0.01)}


def check_limit(check: dict, dtype) -> float:
    """The largest |logit difference| `CHECK_TOLERANCE` allows this check in `dtype`."""
    absolute, relative = CHECK_TOLERANCE[str(dtype).removeprefix("torch.")]
    return absolute + relative * check["reference_max_abs"]


def check_failure(check: dict, setup: Setup, dtype) -> str | None:
    """Why the check fails (logits beyond `CHECK_TOLERANCE` of the reference), in one line; None if it passes."""
    limit, diff = check_limit(check, dtype), check["max_abs_diff"]
    if diff <= limit:  # NaN fails
        return None
    what = f"plan {setup.plan}" if setup.plan else f"degree {setup.degree}"
    return (
        f"engine {setup.engine}, {what}: check failed, max |logit difference| {diff:.3g} against the single-process "
        f"reference exceeds {limit:.3g} ({str(dtype).removeprefix('torch.')}); no timing was written"
    )


SLOWDOWN = "CQIL_TEST_SLOWDOWN"  # a test hook: engines other than the original take this fraction longer


def slow_down(model, fraction: float) -> None:
    """Every forward of `model` sleeps `fraction` of its own time after it (what `SLOWDOWN` asks for): a real,
    slower engine for the tests of `cqil track`, without changing the engine's code."""
    start = {}
    model.register_forward_pre_hook(lambda module, args: start.update(t=time.perf_counter()))
    model.register_forward_hook(lambda module, args, out: time.sleep(fraction * (time.perf_counter() - start["t"])))


def shard(model, setup: Setup, ranks, settings: LatencySettings):
    """This rank's part of the setup's engine in the settings' decode mode (a Decoder), and the check of its logits
    against the single-process eager reference (None where there is nothing to check)."""
    if setup.engine == "pruned":
        model, reference, effect = apply_plan(model, setup.plan), None, {}
    elif setup.engine == "cqil":
        with planned(model, setup.plan):  # the single-process simulation of the same plan
            reference = reference_run(model, settings, ranks.device)
        effect = compare(Decoder(model), reference)  # the original against the simulation: what the plan changes
        model = cqil.shard(model, setup.plan, ranks.rank, settings.placement)
        effect = {f"plan_effect_{key}": effect[key] for key in ("max_abs_diff", "argmax_agreement")}
    elif setup.engine == "tp":
        reference, effect = reference_run(model, settings, ranks.device), {}
        model = tp.shard(model, setup.degree, ranks.device.type)
    else:
        reference, effect = None, {}
    decoder = Decoder(model, settings.mode, settings.backend)
    if reference is None and decoder.mode == "eager":  # the original, a pruned model (its transform is tested)
        return decoder, None
    if reference is None:  # a static or compiled decoder against the same model run eagerly
        reference = reference_run(model, settings, ranks.device)
    return decoder, compare(decoder, reference) | effect


def measure(job: Job, settings: LatencySettings, dtype: str = "auto", device: str = "auto") -> dict | None:
    """Run the job's engine on this rank; rank 0 returns the result (records, check, parts), the others None."""
    spec, setup = job.spec, job.setup
    ranks = runtime.init(settings.timeout, device, share_gpu=settings.share_gpu)
    if ranks.world != setup.ranks:  # under a torchrun of another size
        raise EngineError(f"engine {setup.engine}: needs {setup.ranks} ranks, this run has {ranks.world}")
    job_cores = runtime.job_cores()
    cores = runtime.pin(ranks, settings.threads_per_rank)
    sync = torch.cuda.synchronize if ranks.device.type == "cuda" else lambda: None
    model, _ = load_model(spec, dtype=dtype, device=ranks.device)
    model.to(ranks.device)
    original = setup.engine == "original"
    interleaved = not original and settings.interleaved_baseline
    baseline = copy.deepcopy(model) if interleaved and ranks.rank == 0 else None
    baseline = Decoder(baseline, settings.mode, settings.backend) if baseline is not None else None
    decoder, check = shard(model, setup, ranks, settings)
    model = decoder.model
    # Rank 0's logits are the engine's (under rank-0 placement the only ones): its verdict stops every rank.
    failure = check_failure(check, setup, model.dtype) if check and ranks.rank == 0 else None
    if ranks.share(failure is not None):
        ranks.close()
        raise EngineError(failure) if ranks.rank == 0 else SystemExit(2)  # rank 0 says why
    slowdown = float(os.environ.get(SLOWDOWN, 0)) if not original else 0.0
    if slowdown:
        slow_down(model, slowdown)

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
                    parts.append({"threads": count, **time_parts(model, settings, length, ranks.device, sync)})
    load = window.stop(ranks.total(own_seconds() - cpu), settings.contention_limit)  # every rank's CPU time
    several = setup.ranks > 1
    allreduce = time_allreduce(ranks, settings, model.config.hidden_size, model.dtype, sync) if several else []
    backend = torch.distributed.get_backend() if several else None
    ranks.close()
    if ranks.rank != 0:
        return None
    return {
        "model": spec,
        "engine": setup.engine,
        "plan": str(setup.plan) if setup.plan else None,
        "degree": setup.degree if setup.engine == "tp" else None,
        "ranks": setup.ranks,
        "device": ranks.device.type,
        "backend": backend,
        "mode": settings.mode,
        "shared_gpu": ranks.device.type == "cuda" and backend == "gloo",
        "rank0_cores": cores,  # None: not bound (runtime.pin)
        "dtype": str(model.dtype).removeprefix("torch."),
        "layers": model.config.num_hidden_layers,
        "shape": {key: getattr(model.config, key) for key in SHAPE},
        "check": check,
        "load": load,
        "slowdown": slowdown or None,
        "records": records,
        "parts": parts,
        "allreduce": allreduce,
    }


def table(results: list[dict]):
    """One row per setup, phase and prompt length, with the reduction against the 1-thread (1-rank) original:
    timed in the same run where the engine interleaved it (`baseline: same run`), else the original's own run."""
    rows = [
        {
            "model": result["model"],
            "setup": str(setup),
            "engine": result["engine"],
            "mode": result.get("mode", "eager"),  # results written before the modes were eager
            "ranks": result["ranks"],
            "threads": record["threads"],
            "phase": record["phase"],
            "tokens": record["tokens"],
            "batch_size": record["batch_size"],
            "median_ms": record["median_ms"],
            "p10_ms": record["p10_ms"],
            "p90_ms": record["p90_ms"],
            "baseline_ms": record.get("baseline_median_ms"),
            "baseline": "same run" if "baseline_median_ms" in record else "separate run",
            "ideal": setup.ideal(result["layers"]),
            "check_max_abs_diff": (result["check"] or {}).get("max_abs_diff"),
            "contended": contended(result),
        }
        for result in results
        for record in result["records"]
        for setup in [result_setup(result, record["threads"])]
    ]
    frame = pd.DataFrame(rows)
    key = ["mode", "phase", "tokens", "batch_size"]  # an engine is measured against the original in its own mode
    own = frame[(frame.engine == "original") & (frame.threads == 1)].set_index(key)["median_ms"]
    separate = frame.set_index(key).index.map(own).to_numpy(dtype=float)
    frame["baseline_ms"] = frame.baseline_ms.astype(float).fillna(pd.Series(separate, index=frame.index))
    frame["reduction"] = 1 - frame.median_ms / frame.baseline_ms
    frame["of_ideal"] = frame.reduction / frame.ideal.where(frame.ideal > 0)
    return frame


def withheld(frame: pd.DataFrame) -> pd.Series:
    """The rows of `table` whose reductions rest on a result measured on a busy machine: their own, or the 1-thread
    original's where they are measured against its separate run."""
    busy_original = frame[(frame.engine == "original") & (frame.threads == 1)].contended.any()
    return frame.contended | ((frame.baseline == "separate run") & busy_original)


def run_latency(
    settings: LatencySettings,
    *,
    model: str,
    engine: str,
    out,
    argv: list[str],
    plan: Plan | Prune | None = None,
    degree: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
) -> None:
    """The stage: prefill and decode latency of one engine (original, cqil, tp or pruned), checked against a 1-process
    reference in the same run. cqil and tp run on several ranks: outside torchrun this starts torchrun itself
    (with `argv`, this command's own arguments)."""
    job = Job.check(model, engine, plan, degree)  # a bad plan or degree fails here, before any process starts
    if job.setup.ranks > 1 and not runtime.under_torchrun():
        return runtime.launch(["-m", "cqil", *argv], job.setup.ranks)
    result = measure(job, settings, dtype, device)
    if result is not None:  # rank 0
        if contended(result):
            print(
                f"cqil: warning: contended: {describe(result['load'])} while this ran; the latency table withholds "
                "its reductions, the simulator's fit and `cqil track` leave it out"
            )
        write_json(
            out,
            {
                **result,
                "settings": asdict(settings),
                "provenance": provenance(
                    {
                        "model": model,
                        "engine": engine,
                        "degree": degree,
                        "dtype": dtype,
                        "device": device,
                        "settings": asdict(settings),
                    },
                    plan,
                ),
            },
        )


def run_latency_table(inputs, *, out, figure=None, title: str = "") -> None:
    """The stage: the latency table (CSV, and Markdown beside it) and figure from `cqil latency` files of one model.
    A result measured on a busy machine (`load.contended`) keeps its row, marked, without its reductions, and the
    stage says so."""
    results = [json.loads(Path(path).read_text()) for path in inputs]
    if shared := [path for path, result in zip(inputs, results) if result.get("shared_gpu")]:
        raise EngineError(f"{shared[0]}: its ranks shared one GPU (a check of the CUDA path), not a timing for a table")
    for path, result in zip(inputs, results):
        if contended(result):
            print(
                f"cqil: warning: {path}: measured on a busy machine ({describe(result['load'])}): its reductions are "
                "left out of the table and the figure; rerun it on a quiet machine"
            )
    frame = table(results)
    frame.loc[withheld(frame), ["reduction", "of_ideal"]] = np.nan  # a contended row's times are kept, marked
    write_csv(out, frame)
    write_markdown(Path(out).with_suffix(".md"), frame.drop(columns=["model"]))
    if figure:
        latency_figure(frame, results, title, figure)


# --- One decoder layer of a named shape (the GPU script: scripts/gpu_checks.sh) ----------------------


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
