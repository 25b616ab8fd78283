"""What to run: a CQIL plan (which adjacent decoder layers share one input), and a latency setup.

`Plan(start=12, end=30, size=2, bypass=0)` is written `S12-E30-P2-D0`: layers [S, E) (0-indexed, end
exclusive) form consecutive groups of P layers; the layers of a group all read the group's input and
their deltas are summed. D >= 1 adds the attention outputs of the previous D layers of the group to a
layer's MLP input ("bypassing"), in the paper's form or the official code's form (PAPER.md):

    paper:    delta_k = A_k + MLP_k(norm(x + A_k + B_k))
    official: delta_k = A_k + B_k + MLP_k(norm(x + A_k + B_k))      (B_k counted in the residual too)

The name is also the artifact path component; the official mode appends `-official`.

`Setup(engine, plan, degree, threads)` is what a latency run times: the original on one rank, CQIL on
the plan's P ranks, tensor parallelism on `degree` ranks (in the simulator, CQIL x TP). `setup.name`
is its path component (`cqil-S12-E28-P2-D0`), `str(setup)` its label in tables (`cqil S12-E28-P2-D0`);
`Setup.parse` reads either.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from .errors import PlanError

BYPASS_MODES = ("paper", "official")
_NAME = re.compile(r"S(\d+)-E(\d+)-P(\d+)-D(\d+)(?:-(paper|official))?")
ENGINES = ("original", "cqil", "tp")


@dataclass(frozen=True, order=True)
class Plan:
    start: int  # first grouped layer S (0-indexed, inclusive)
    end: int  # end of the grouped range E (exclusive)
    size: int  # layers per group P = ranks that compute one group concurrently
    bypass: int = 0  # bypass distance D: earlier attention outputs of the group fed to each MLP
    bypass_mode: str = "paper"  # "paper" (the paper's formula) or "official" (the released code's)

    def __post_init__(self):
        for field in ("start", "end", "size", "bypass"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PlanError(f"plan {field} must be an integer, got {value!r}")
        if self.bypass_mode not in BYPASS_MODES:
            raise PlanError(f"plan bypass_mode={self.bypass_mode!r}: allowed are {', '.join(BYPASS_MODES)}")
        if self.size < 1:
            raise PlanError(f"plan {self}: P={self.size} must be >= 1")
        if not 0 <= self.start < self.end:
            raise PlanError(f"plan {self}: need 0 <= S < E, got S={self.start}, E={self.end}")
        if (self.end - self.start) % self.size:
            raise PlanError(f"plan {self}: E-S={self.end - self.start} must be a multiple of P={self.size}")
        if not 0 <= self.bypass < self.size:
            raise PlanError(f"plan {self}: D={self.bypass} must satisfy 0 <= D < P={self.size}")
        if self.bypass == 0:  # without bypassing both modes are the same computation: one name for it
            object.__setattr__(self, "bypass_mode", "paper")

    def __str__(self) -> str:
        name = f"S{self.start}-E{self.end}-P{self.size}-D{self.bypass}"
        return name + ("-official" if self.bypass_mode == "official" else "")

    @staticmethod
    def _fields(name: str) -> tuple[int, int, int, int, str]:
        match = _NAME.fullmatch(name.strip())
        if not match:
            raise PlanError(f"plan {name!r}: expected the form S12-E30-P2-D0[-official] (0-indexed, end exclusive)")
        s, e, p, d, mode = match.groups()
        return int(s), int(e), int(p), int(d), mode or "paper"

    @classmethod
    def parse(cls, name: str) -> Plan:
        """`S12-E30-P2-D0` (0-indexed, end exclusive), optionally suffixed `-paper` or `-official`."""
        return cls(*cls._fields(name))

    @classmethod
    def from_paper(cls, name: str) -> Plan:
        """Convert the paper's 1-indexed names: its S13-E30 is layers 13..30 counted from 1, our S12-E30.

        A 1-indexed inclusive end equals a 0-indexed exclusive end, so only S moves.
        """
        s, e, p, d, mode = cls._fields(name)
        if s == 0:
            raise PlanError(f"plan {name!r}: 1-indexed names start at layer 1, got S0")
        return cls(s - 1, e, p, d, mode)

    def validate(self, num_layers: int) -> Plan:
        """Check the plan fits a model of `num_layers` decoder layers; returns the plan."""
        if self.end > num_layers:
            raise PlanError(f"plan {self}: E={self.end} exceeds the model's {num_layers} layers (E <= {num_layers})")
        return self

    def groups(self) -> list[range]:
        """The groups of layer indices that share one input, in order: S12-E16-P2 -> [12,13], [14,15]."""
        return [range(i, i + self.size) for i in range(self.start, self.end, self.size)]

    def steps(self, num_layers: int) -> int:
        """Sequential layer-steps of the planned model: each group of P layers counts as one step."""
        self.validate(num_layers)
        span = self.end - self.start
        return num_layers - span + span // self.size

    def ideal_reduction(self, num_layers: int) -> float:
        """Latency reduction if only layers cost time and a group costs one layer: (E-S)(1-1/P)/L."""
        self.validate(num_layers)
        return (self.end - self.start) * (self.size - 1) / (self.size * num_layers)  # exact for 20%, 37.5%, ...

    @classmethod
    def grid(
        cls,
        num_layers: int,
        starts,
        ends,
        sizes,
        bypasses=(0,),
        modes=("paper",),
    ) -> list[Plan]:
        """Every valid plan in the product of the ranges, skipping combinations that do not tile.

        Combinations where E-S is not a multiple of P, D >= P, or E > L are left out; P=1 plans
        (the original model in disguise) too. Sorted and without duplicates.
        """
        plans = set()
        for s, e, p, d, mode in itertools.product(starts, ends, sizes, bypasses, modes):
            if p > 1 and 0 <= s < e <= num_layers and (e - s) % p == 0 and d < p:
                plans.add(cls(s, e, p, d, mode))
        return sorted(plans)


PLAN_NAME = r"S\d+-E\d+-P\d+-D\d+(?:-official)?"  # as written in paths (`-paper` is the default, left out)
_SETUP = re.compile(  # a path component (`cqil-S12-E28-P2-D0`, `tp-2`) or a table label (`cqil S12-E28-P2-D0 x tp 2`)
    rf"(?P<engine>original)(?:, (?P<threads>\d+) threads?)?"
    rf"|(?P<cqil>cqil)[- ](?P<plan>{PLAN_NAME})(?:(?: x |-x-)tp[- ](?P<split>\d+))?"
    rf"|(?P<tp>tp)[- ](?P<degree>\d+)"
)
SETUP_NAME = rf"original|cqil-{PLAN_NAME}|tp-\d+"  # the path components a latency job writes (a wildcard constraint)


@dataclass(frozen=True)
class Setup:
    engine: str  # original | cqil | tp
    plan: Plan | None = None  # cqil: the plan, on its P ranks
    degree: int = 1  # tp: ranks each layer is split over (with a plan: CQIL x TP, simulated only)
    threads: int | None = None  # CPU threads of the original, where a table tells them apart

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise PlanError(f"setup engine {self.engine!r}: allowed are {', '.join(ENGINES)}")
        if (self.engine == "cqil") != (self.plan is not None):
            raise PlanError(f"setup {self.engine}: {'needs a plan' if self.engine == 'cqil' else 'takes no plan'}")
        if self.degree < 1 or (self.engine == "tp") != (self.degree > 1) and self.engine != "cqil":
            raise PlanError(f"setup {self.engine}: degree {self.degree} (tp needs 2 or more, the original none)")

    @classmethod
    def of(cls, plan: Plan | None = None, degree: int = 1, threads: int | None = None) -> Setup:
        """The setup that runs `plan` (if any) with each layer split `degree` ways."""
        return cls("cqil" if plan else "tp" if degree > 1 else "original", plan, degree, threads)

    @property
    def ranks(self) -> int:
        return (self.plan.size if self.plan else 1) * self.degree

    @property
    def name(self) -> str:
        """The path component of the setup's latency record: `original`, `cqil-S12-E28-P2-D0`, `tp-2`."""
        if self.engine == "original":
            return "original"
        return (
            f"cqil-{self.plan}" + (f"-x-tp-{self.degree}" if self.degree > 1 else "")
            if self.plan
            else f"tp-{self.degree}"
        )

    def __str__(self) -> str:
        """The label in tables: `original, 2 threads` (or `original` where threads do not matter), `cqil S12-E28-P2-D0`,
        `tp 2`, `cqil S12-E28-P2-D0 x tp 2`."""
        if self.engine == "original":
            return "original" + (f", {self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else "")
        return (
            f"cqil {self.plan}" + (f" x tp {self.degree}" if self.degree > 1 else "")
            if self.plan
            else f"tp {self.degree}"
        )

    @classmethod
    def parse(cls, text: str) -> Setup:
        match = _SETUP.fullmatch(text.strip())
        if not match:
            raise PlanError(
                f"setup {text!r}: expected original, cqil-<plan> or tp-<n> (or a table label: "
                f"'original, 2 threads', 'cqil <plan>', 'tp <n>')"
            )
        if match["engine"]:
            return cls("original", threads=int(match["threads"]) if match["threads"] else None)
        if match["cqil"]:
            return cls("cqil", Plan.parse(match["plan"]), int(match["split"] or 1))
        return cls("tp", degree=int(match["degree"]))

    def ideal(self, num_layers: int) -> float:
        """Layers-only ideal reduction: (E-S)(1-1/P)/L for CQIL, 1-1/n for TP, both for CQIL x TP; the original on
        n threads counts as an n-way split."""
        split = self.threads or 1 if self.engine == "original" else self.degree
        return 1 - (1 - (self.plan.ideal_reduction(num_layers) if self.plan else 0.0)) / split
