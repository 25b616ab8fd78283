"""What to run: a CQIL plan (which adjacent decoder layers share one input), and a latency setup.

`Plan(start=12, end=30, size=2, bypass=0)` is written `S12-E30-P2-D0`: layers [S, E) (0-indexed, end
exclusive) form consecutive groups of P layers; the layers of a group all read the group's input and
their deltas are summed. D >= 1 adds the attention outputs of the previous D layers of the group to a
layer's MLP input ("bypassing"), in the paper's form or the official code's form (Photooon/CQIL on GitHub):

    paper:    delta_k = A_k + MLP_k(norm(x + A_k + B_k))
    official: delta_k = A_k + B_k + MLP_k(norm(x + A_k + B_k))      (B_k counted in the residual too)

The name is also the artifact path component; the official mode appends `-official`. The official README
names plans in the same convention: `Plan.from_paper("P2 D0 S12 E30")` is `S12-E30-P2-D0`.

LP's pairing (Fan et al., "Leveraging the true depth of LLMs", code noctrog/effective-depth) is a third
mode, `S16-E28-P2-LP`: every MLP of a group reads all of the group's attention outputs, not only earlier ones,

    lp:       h = x + sum_k A_k(x);   y = h + sum_k MLP_k(norm(h))

For P = 2 this is LP's h = x + A_1 + A_2, y = h + M_1(h) + M_2(h); for P > 2 the same two sums run over
the P layers (one all-reduce of the attention outputs, one of the MLP outputs). D does not apply (0).

`Prune(removed=(17, 19, 20))`, written `drop-17-19-20`, is the equal-depth baseline that removes layers
instead of grouping them (ShortGPT, SLEB; `baselines.py` chooses which). It answers the same questions as a
plan (`validate`, `steps`, `ideal_reduction`, `start`/`end` of the range it touches), so it flows through the
same stages: `parse_plan` reads either name.

`Setup(engine, plan, degree, threads)` is what a latency run times: the original on one rank, CQIL on
the plan's P ranks, tensor parallelism on `degree` ranks (in the simulator, CQIL x TP). `setup.name`
is its path component (`cqil-S12-E28-P2-D0`), `str(setup)` its label in tables (`cqil S12-E28-P2-D0`);
`Setup.parse` reads either. A pruned model runs on one rank: `Setup("pruned", Prune(...))`, named `drop-17-19`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from .errors import PlanError

BYPASS_MODES = ("paper", "official", "lp")
_NAME = re.compile(r"S(\d+)-E(\d+)-P(\d+)-(?:D(\d+)(?:-(paper|official))?|(LP))")
_PRUNE = re.compile(r"drop((?:-\d+)+)")
_PAPER_FIELD = re.compile(r"([PDSE])(\d+)")  # one field of an official name: P2, D0, S12, E30
ENGINES = ("original", "cqil", "tp", "pruned")


@dataclass(frozen=True, order=True)
class Plan:
    start: int  # first grouped layer S (0-indexed, inclusive)
    end: int  # end of the grouped range E (exclusive)
    size: int  # layers per group P = ranks that compute one group concurrently
    bypass: int = 0  # bypass distance D: earlier attention outputs of the group fed to each MLP
    bypass_mode: str = "paper"  # "paper" (the paper's formula), "official" (the released code's) or "lp" (LP's)

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
        if self.bypass_mode == "lp" and self.bypass:
            raise PlanError(f"plan {self}: LP mixes all attention outputs of a group; D={self.bypass} must be 0")
        if self.bypass == 0 and self.bypass_mode != "lp":  # without bypassing paper = official: one name for it
            object.__setattr__(self, "bypass_mode", "paper")

    def __str__(self) -> str:
        if self.bypass_mode == "lp":
            return f"S{self.start}-E{self.end}-P{self.size}-LP"
        name = f"S{self.start}-E{self.end}-P{self.size}-D{self.bypass}"
        return name + ("-official" if self.bypass_mode == "official" else "")

    @staticmethod
    def _fields(name: str) -> tuple[int, int, int, int, str]:
        match = _NAME.fullmatch(name.strip())
        if not match:
            raise PlanError(
                f"plan {name!r}: expected the form S12-E30-P2-D0[-official] or S12-E30-P2-LP (0-indexed, end exclusive)"
            )
        s, e, p, d, mode, lp = match.groups()
        return int(s), int(e), int(p), int(d or 0), "lp" if lp else mode or "paper"

    @classmethod
    def parse(cls, name: str) -> Plan:
        """`S12-E30-P2-D0` (0-indexed, end exclusive), optionally suffixed `-paper` or `-official`."""
        return cls(*cls._fields(name))

    @classmethod
    def from_paper(cls, name: str) -> Plan:
        """A plan as the official README and adapter names write it: `P2 D0 S12 E30` is our `S12-E30-P2-D0`.

        The official README counts layers from 0 with an exclusive end, as we do, so the numbers carry over (its
        revisions before commit 1ed3d8d wrote S13 for the same plan). `D` may be left out (`P4 S14 E30`: D0). The
        official code counts the bypassed attention outputs in the residual too, so a D >= 1 plan comes back in
        the `official` mode (`S12-E30-P2-D1-official`), the arithmetic its adapter was trained with.
        """
        fields = {}
        for token in name.split():
            match = _PAPER_FIELD.fullmatch(token)
            if not match or match[1] in fields:
                raise PlanError(
                    f"plan {name!r}: expected the official form P2 D0 S12 E30 (P, S and E once each, D optional; "
                    f"0-indexed, end exclusive)"
                )
            fields[match[1]] = int(match[2])
        if missing := [key for key in "PSE" if key not in fields]:
            raise PlanError(f"plan {name!r}: needs {', '.join(missing)} (the official form P2 D0 S12 E30)")
        return cls(fields["S"], fields["E"], fields["P"], fields.get("D", 0), "official")

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

        Combinations where E-S is not a multiple of P, D >= P (D > 0 for LP), or E > L are left out; P=1 plans
        (the original model in disguise) too. Sorted and without duplicates.
        """
        plans = set()
        for s, e, p, d, mode in itertools.product(starts, ends, sizes, bypasses, modes):
            if p > 1 and 0 <= s < e <= num_layers and (e - s) % p == 0 and d < p and not (mode == "lp" and d):
                plans.add(cls(s, e, p, d, mode))
        return sorted(plans)


@dataclass(frozen=True, order=True)
class Prune:
    removed: tuple[int, ...]  # decoder layers left out (0-indexed), ascending

    def __post_init__(self):
        removed = tuple(self.removed)
        if not removed or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in removed):
            raise PlanError(f"prune {removed!r}: needs one or more layer indices >= 0")
        if len(set(removed)) < len(removed):
            raise PlanError(f"prune {removed!r}: a layer is listed twice")
        object.__setattr__(self, "removed", tuple(sorted(removed)))

    def __str__(self) -> str:
        return "drop-" + "-".join(map(str, self.removed))

    @classmethod
    def parse(cls, name: str) -> Prune:
        match = _PRUNE.fullmatch(name.strip())
        if not match:
            raise PlanError(f"prune {name!r}: expected the form drop-17-19-20 (the removed layers, 0-indexed)")
        return cls(tuple(int(i) for i in match[1].split("-")[1:]))

    # What a plan answers too, so a pruned model goes through the same stages:
    start = property(lambda self: self.removed[0])  # first layer it changes (scoring starts there)
    end = property(lambda self: self.removed[-1] + 1)  # end of the range it changes
    size = 1  # one rank
    bypass = 0
    bypass_mode = None

    def validate(self, num_layers: int) -> Prune:
        if self.end > num_layers:
            raise PlanError(f"prune {self}: layer {self.end - 1} exceeds the model's {num_layers} layers")
        if len(self.removed) >= num_layers:
            raise PlanError(f"prune {self}: removes all {num_layers} layers")
        return self

    def steps(self, num_layers: int) -> int:
        return num_layers - len(self.validate(num_layers).removed)

    def ideal_reduction(self, num_layers: int) -> float:
        return len(self.validate(num_layers).removed) / num_layers


def parse_plan(name: str) -> Plan | Prune:
    """A plan (`S12-E30-P2-D0`, `S12-E30-P2-LP`) or a prune spec (`drop-17-19-20`) from its name."""
    return Prune.parse(name) if name.strip().startswith("drop") else Plan.parse(name)


PRUNE_NAME = r"drop(?:-\d+)+"
CQIL_NAME = r"S\d+-E\d+-P\d+-(?:D\d+(?:-official)?|LP)"  # as written in paths (`-paper` is the default, left out)
PLAN_NAME = rf"(?:{CQIL_NAME}|{PRUNE_NAME})"  # one group: a suffix after it applies to either
_SETUP = re.compile(  # a path component (`cqil-S12-E28-P2-D0`, `tp-2`) or a table label (`cqil S12-E28-P2-D0 x tp 2`)
    rf"(?P<engine>original)(?:, (?P<threads>\d+) threads?)?"
    rf"|(?P<cqil>cqil)[- ](?P<plan>{CQIL_NAME})(?:(?: x |-x-)tp[- ](?P<split>\d+))?"
    rf"|(?P<tp>tp)[- ](?P<degree>\d+)"
    rf"|(?:pruned )?(?P<prune>{PRUNE_NAME})"
)
SETUP_NAME = rf"original|cqil-{CQIL_NAME}|tp-\d+|{PRUNE_NAME}"  # the path components a latency job writes


@dataclass(frozen=True)
class Setup:
    engine: str  # original | cqil | tp | pruned
    plan: Plan | Prune | None = None  # cqil: the plan, on its P ranks; pruned: the removed layers, on 1 rank
    degree: int = 1  # tp: ranks each layer is split over (with a plan: CQIL x TP, simulated only)
    threads: int | None = None  # CPU threads of the original, where a table tells them apart

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise PlanError(f"setup engine {self.engine!r}: allowed are {', '.join(ENGINES)}")
        wants = {"cqil": Plan, "pruned": Prune}.get(self.engine)
        if not (isinstance(self.plan, wants) if wants else self.plan is None):
            raise PlanError(f"setup {self.engine}: {f'needs a {wants.__name__.lower()}' if wants else 'takes no plan'}")
        if self.degree < 1 or (self.engine == "tp") != (self.degree > 1) and self.engine != "cqil":
            raise PlanError(f"setup {self.engine}: degree {self.degree} (tp needs 2 or more, the others none)")

    @classmethod
    def of(cls, plan: Plan | Prune | None = None, degree: int = 1, threads: int | None = None) -> Setup:
        """The setup that runs `plan` (if any) with each layer split `degree` ways."""
        if isinstance(plan, Prune):
            return cls("pruned", plan)
        return cls("cqil" if plan else "tp" if degree > 1 else "original", plan, degree, threads)

    @property
    def ranks(self) -> int:
        return (self.plan.size if self.plan else 1) * self.degree

    @property
    def name(self) -> str:
        """The path component of the setup's latency record: `original`, `cqil-S12-E28-P2-D0`, `tp-2`, `drop-17-19`."""
        if self.engine in ("original", "pruned"):
            return str(self.plan or "original")
        return (
            f"cqil-{self.plan}" + (f"-x-tp-{self.degree}" if self.degree > 1 else "")
            if self.plan
            else f"tp-{self.degree}"
        )

    def __str__(self) -> str:
        """The label in tables: `original, 2 threads` (or `original` where threads do not matter), `cqil S12-E28-P2-D0`,
        `tp 2`, `cqil S12-E28-P2-D0 x tp 2`, `pruned drop-17-19`."""
        if self.engine == "original":
            return "original" + (f", {self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else "")
        if self.engine == "pruned":
            return f"pruned {self.plan}"
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
                f"setup {text!r}: expected original, cqil-<plan>, tp-<n> or drop-<layers> (or a table label: "
                f"'original, 2 threads', 'cqil <plan>', 'tp <n>', 'pruned drop-<layers>')"
            )
        if match["engine"]:
            return cls("original", threads=int(match["threads"]) if match["threads"] else None)
        if match["cqil"]:
            return cls("cqil", Plan.parse(match["plan"]), int(match["split"] or 1))
        if match["prune"]:
            return cls("pruned", Prune.parse(match["prune"]))
        return cls("tp", degree=int(match["degree"]))

    def ideal(self, num_layers: int) -> float:
        """Layers-only ideal reduction: (E-S)(1-1/P)/L for CQIL, 1-1/n for TP, both for CQIL x TP, n/L for n layers
        pruned; the original on n threads counts as an n-way split."""
        split = self.threads or 1 if self.engine == "original" else self.degree
        return 1 - (1 - (self.plan.ideal_reduction(num_layers) if self.plan else 0.0)) / split
