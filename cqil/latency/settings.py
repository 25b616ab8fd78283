"""What one `cqil latency` run is asked to time, checked whole before any process starts.

`LatencySettings` is the config section `latency` (how to time); `Job.check` turns the command line's model,
engine and plan or degree into one checked value: a bad plan, degree or mode fails here, in one line, before
torchrun starts a rank. The ranks take the job as it is; what they still check needs the live run (the
process group's size, the engine's logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..decode import MODES
from ..errors import EngineError
from ..models import load_config
from ..plan import ENGINES, Plan, Prune, Setup
from ..runtime import cqil, tp
from ..transform import check_prune


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
    contention_limit: float = 0.1  # share of the job's cores' time other processes may take (contention.py)
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
