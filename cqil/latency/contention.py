"""Was the machine busy while we timed? Other processes' CPU time on this job's cores, around a window.

    window = Window.start(cores)          # before the timed repeats
    ...                                   # time things
    load = window.stop(own_seconds, limit=0.1)   # own_seconds: CPU time this job's ranks used meanwhile

A latency measured while other work runs is not a property of the engine: other work on the same cores
slows the baseline and the engines unequally and turns CQIL's gain into a loss (docs/tracking.md, *Busy
machines*, has the numbers). The kernel counts every core's busy time (/proc/stat: user, nice, system, irq, softirq and
steal, the time a hypervisor gave to another machine); what this job's own processes did not use of it
went to others. `share` is that time as a fraction of the cores' capacity over the window; beyond `limit`
the measurement is *contended*: the latency table withholds its reductions, the simulator's fit and
`cqil track` leave it out.
Where there is no /proc/stat (macOS) the load is unknown and nothing is flagged.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

BUSY = (0, 1, 2, 5, 6, 7)  # /proc/stat columns after the name: user nice system [idle iowait] irq softirq steal
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_seconds(cores) -> float | None:
    """CPU seconds the kernel has counted as busy on `cores` since boot, or None without /proc/stat."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{core}" for core in cores}
    rows = [line.split() for line in lines]
    ticks = [int(row[1 + i]) for row in rows if row and row[0] in wanted for i in BUSY]
    return sum(ticks) / TICK if ticks else None


def own_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Window:
    cores: tuple
    wall: float
    busy: float | None

    @classmethod
    def start(cls, cores) -> Window:
        cores = tuple(sorted(cores))
        return cls(cores, time.perf_counter(), busy_seconds(cores))

    def stop(self, own: float, limit: float) -> dict:
        """The load over the window; `own`: CPU seconds this job's processes used in it."""
        wall, busy = time.perf_counter() - self.wall, busy_seconds(self.cores)
        others = None if busy is None or self.busy is None else max(busy - self.busy - own, 0.0)
        share = None if others is None else others / (wall * len(self.cores))
        return {
            "cores": list(self.cores),
            "seconds": wall,
            "own_cpu_seconds": own,
            "others_cpu_seconds": others,
            "share": share,  # of the cores' time over the window that went to other processes
            "limit": limit,
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "contended": bool(share is not None and share > limit),
        }


def describe(load: dict) -> str:
    """One line of how busy the machine was: `other processes took 53% of cores [0, 1] (limit 10%)`."""
    return f"other processes took {load['share']:.0%} of cores {load['cores']} (limit {load['limit']:.0%})"


def contended(result: dict) -> bool:
    """Whether a `cqil latency` result was measured on a busy machine (older results carry no load: not flagged)."""
    return bool((result.get("load") or {}).get("contended"))
