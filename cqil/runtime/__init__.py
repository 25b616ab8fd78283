"""Multi-process inference over torch.distributed: one process per rank, started by torchrun.

    cqil latency --engine cqil --plan S12-E28-P2-D0   # starts `torchrun --nproc_per_node 2` itself

Engines: `cqil.py` spreads the layers of each group over P ranks (one all-reduce per group);
`tp.py` is the tensor-parallel baseline through torch's DTensor. gloo on CPU, NCCL with one GPU per
rank, gloo with CUDA tensors where ranks share a GPU (only when asked: `share_gpu`). A rank that
raises, dies or hangs ends the whole run with an error: torchrun stops the other ranks when one
exits, and a collective that waits longer than `timeout` raises on the ranks waiting.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import EngineError

ERRORS = "CQIL_RANK_ERRORS"  # where `launch` asks its ranks to leave their one-line errors


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def share(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank."""
        if self.world == 1:
            return flag
        shared = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(shared, src=0)
        return bool(shared.item())

    def total(self, value: float) -> float:
        """The sum of `value` over the ranks, on every rank."""
        if self.world == 1:
            return value
        summed = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return float(summed.item())

    def close(self) -> None:
        """Leave the process group together: a rank that exits while another still talks can abort it."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


DEVICES = ("auto", "cpu", "cuda")


def local_ranks() -> int:
    """The ranks on this machine: torchrun says so in LOCAL_WORLD_SIZE; other launchers' worlds are one machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))


def resolve_device(setting: str = "auto", share_gpu: bool = False) -> torch.device:
    """The device of this process, the one rule of every stage: `auto` is this rank's GPU (cuda:LOCAL_RANK) where
    CUDA is present, else the CPU; `cpu` and `cuda` insist.

    More ranks on this machine than visible GPUs fail, unless `share_gpu` asks for the shared-GPU check (ranks take
    the GPUs in turn): each rank meant to time its own GPU would otherwise time a shared one.
    """
    if setting not in DEVICES:
        raise EngineError(f"device {setting!r}: allowed are {', '.join(DEVICES)}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EngineError("device 'cuda': torch sees no CUDA device here (use auto or cpu)")
    gpus, ranks = torch.cuda.device_count(), local_ranks()
    if ranks > gpus and not share_gpu:
        raise EngineError(
            f"device {setting!r}: {ranks} ranks on this machine but {gpus} visible GPU(s); give each rank a GPU, "
            f"or ask for the shared-GPU check (share_gpu), whose timings are no rank's own"
        )
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % gpus}")


def init(timeout: float = 300.0, device: str = "auto", share_gpu: bool = False) -> Ranks:
    """This process's rank, world size and device (`resolve_device`); joins the process group when there are
    several ranks. `share_gpu` lets ranks share a GPU: a check of the CUDA path, never a timing."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    where = resolve_device(device, share_gpu)
    cuda = where.type == "cuda"
    if cuda:
        torch.cuda.set_device(where)
    # NCCL refuses two ranks on one device; gloo takes CUDA tensors (through the host).
    nccl = cuda and local_ranks() <= torch.cuda.device_count()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if nccl else "gloo", timeout=timedelta(seconds=timeout), device_id=where if nccl else None
        )
    return Ranks(rank, world, where)


def job_cores() -> list[int]:
    """The cores this job may use (under SLURM, the job's), as the process started: before any rank binds itself."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def pin(ranks: Ranks, threads: int) -> list[int] | None:
    """On CPU, bind rank r to its own `threads` cores among those this job may use (as MPI's `--bind-to core`), and
    size its intra-op thread pool to them.

    Unbound ranks get moved between cores and share them with the launcher; what binding buys is measured
    in docs/latency.md (*Measured on 2 CPU cores*). Returns the cores, or None where the ranks are on GPUs, there is
    one rank, too few cores, or no affinity API (macOS).
    """
    if ranks.device.type != "cpu" or ranks.world == 1 or not hasattr(os, "sched_setaffinity"):
        return None
    cores = job_cores()
    if len(cores) < ranks.world * threads:
        return None
    mine = cores[ranks.rank * threads : (ranks.rank + 1) * threads]
    bind(mine)
    # A pool larger than its cores spins its OpenMP threads against each other: a job that Snakemake gives 2 threads
    # starts each rank with OMP_NUM_THREADS=2, and loading and checking the engine then took twice as long.
    torch.set_num_threads(threads)
    return mine


def bind(cores) -> None:
    """Restrict every thread this process has started (gloo's too), not just the calling one, to `cores`."""
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(thread), cores)


def launch(program: list[str], nproc: int) -> None:
    """Run `program` (`["-m", "cqil", ...]` or `["script.py", ...]`) on `nproc` local ranks with torchrun.

    Raises EngineError if any rank fails. `--standalone` lets torchrun pick a free port, so a busy default port or a
    second run on the same machine does not collide.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *program]
    with tempfile.TemporaryDirectory() as errors:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # torchrun's default, no warning
            ERRORS: errors,
        }
        status = subprocess.run(command, env=env).returncode
        reasons = [path.read_text() for path in sorted(Path(errors).iterdir())]
    if status:  # the ranks' own one-line errors, or where to look
        raise EngineError(
            reasons[0]
            if reasons
            else f"{nproc} ranks: torchrun exited with status {status} (the failing rank's error is above)"
        )


def report_error(message: str) -> None:
    """Under `launch`, hand a rank's one-line error to the launcher, which repeats it as its own last line."""
    if ERRORS in os.environ:
        (Path(os.environ[ERRORS]) / f"rank{int(os.environ.get('RANK', 0)):05d}").write_text(message)
