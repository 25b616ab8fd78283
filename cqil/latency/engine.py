"""Latency of the original model (1 rank), CQIL (P ranks), tensor parallelism (n ranks) and a pruned model (1 rank).

    cqil latency --model smollm2-135m --engine cqil --plan S12-E28-P2-D0 --out cqil.json
    cqil latency --model smollm2-135m --engine pruned --plan drop-17-19-20-22-23-25 --out pruned.json

`run_latency` checks the job whole (settings.py) before any process starts, then each rank builds its part of
the engine, checks its logits against a single-process reference in the same run (check.py) and times it
(timing.py); rank 0 writes the result. On CPU each rank of a multi-rank engine is bound to its own cores
(`runtime.pin`). `cqil latency-table` (table.py) reads the results.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict

import torch

from .. import runtime
from ..decode import Decoder
from ..errors import EngineError
from ..io import provenance, write_json
from ..models import load_model
from ..plan import Plan, Prune, Setup
from ..runtime import cqil, tp
from ..transform import apply_plan, planned
from .check import check_failure, compare, reference_run
from .contention import contended, describe
from .settings import Job, LatencySettings
from .timing import SLOWDOWN, slow_down, time_allreduce, time_engine

SHAPE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)  # what the simulator needs to know of the model


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


def checked_engine(job: Job, settings: LatencySettings, ranks, dtype: str):
    """This rank's engine (a Decoder) and its check; rank 0's copy of the original to time between the engine's
    repeats (`interleaved_baseline`; else None); the slowdown the tests ask for (`SLOWDOWN`). A check that fails
    stops every rank, rank 0 saying why: its logits are the engine's (under rank-0 placement the only ones)."""
    model, _ = load_model(job.spec, dtype=dtype, device=ranks.device)
    model.to(ranks.device)
    original = job.setup.engine == "original"
    baseline = None
    if not original and settings.interleaved_baseline and ranks.rank == 0:
        baseline = Decoder(copy.deepcopy(model), settings.mode, settings.backend)
    decoder, check = shard(model, job.setup, ranks, settings)
    failure = check_failure(check, job.setup, decoder.model.dtype) if check and ranks.rank == 0 else None
    if ranks.share(failure is not None):
        ranks.close()
        raise EngineError(failure) if ranks.rank == 0 else SystemExit(2)  # rank 0 says why
    slowdown = float(os.environ.get(SLOWDOWN, 0)) if not original else 0.0
    if slowdown:
        slow_down(decoder.model, slowdown)
    return decoder, check, baseline, slowdown


def measure(job: Job, settings: LatencySettings, dtype: str = "auto", device: str = "auto") -> dict | None:
    """Run the job's engine on this rank; rank 0 returns the result (records, check, parts), the others None."""
    setup = job.setup
    ranks = runtime.init(settings.timeout, device, share_gpu=settings.share_gpu)
    if ranks.world != setup.ranks:  # under a torchrun of another size
        raise EngineError(f"engine {setup.engine}: needs {setup.ranks} ranks, this run has {ranks.world}")
    job_cores = runtime.job_cores()
    cores = runtime.pin(ranks, settings.threads_per_rank)
    sync = torch.cuda.synchronize if ranks.device.type == "cuda" else lambda: None
    decoder, check, baseline, slowdown = checked_engine(job, settings, ranks, dtype)
    model = decoder.model
    records, parts, load = time_engine(decoder, setup, settings, ranks, sync, job_cores, baseline)
    several = setup.ranks > 1
    allreduce = time_allreduce(ranks, settings, model.config.hidden_size, model.dtype, sync) if several else []
    backend = torch.distributed.get_backend() if several else None
    ranks.close()
    if ranks.rank != 0:
        return None
    return {
        "model": job.spec,
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
