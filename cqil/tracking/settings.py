"""The config section `track`: which way each metric kind is better, and the smallest change worth a verdict.

A metric's kind is the last part of its name (`.../prefill-512/ms` -> `ms`); `DEFAULT_RULES` gives each kind
its `Rule` (cqil/tracking/verdict.py), and `TrackSettings.min_effects` overrides them from the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import CqilError
from .verdict import Rule

DEFAULT_RULES = {  # metric kind -> which way is better, and the smallest change worth a verdict
    "perplexity": Rule("lower", 0.05),
    "kl": Rule("lower", 0.10),
    "top1": Rule("higher", 0.02, False),
    "acc": Rule("higher", 2.0, False),  # accuracy in points (quality.csv)
    "acc_norm": Rule("higher", 2.0, False),
    "word_perplexity": Rule("lower", 0.05),
    "ms": Rule("lower", 0.05, timed=True, drifts=True),  # a latency's median: judged by the history's spread
    "ratio": Rule("lower", 0.05, timed=True),  # its latency over the same repeat's original's: by its repeats
    "reduction": Rule("higher", 0.05, False, timed=True),  # 1 - ratio of medians: by the history's spread
    "plans_per_minute": Rule("higher", 0.20, timed=True),
    "seconds": Rule("lower", 0.50, timed=True),  # a stage's wall time, measured once per run
}


def kind(name: str) -> str:
    """A metric's kind, the last part of its name (`.../prefill-512/ms` -> `ms`): which rule judges it."""
    return name.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class TrackSettings:
    label: str | None = None  # a name for this run's record, to compare against later (a baseline)
    min_effects: dict = field(default_factory=dict)  # metric kind -> {direction, min_effect, relative}
    level: float = 0.95  # a change is significant when its test's p-value is below 1 - level
    window: int = 10  # the history's spread of a metric: over this many earlier comparable records (3 at least)

    def __post_init__(self):
        allowed = ", ".join(f.name for f in fields(Rule))
        for kind, given in self.min_effects.items():
            try:
                rule = Rule(**given)
            except TypeError:
                raise CqilError(f"track.min_effects.{kind}: {given!r} needs the keys {allowed}") from None
            if rule.direction not in ("lower", "higher"):
                raise CqilError(f"track.min_effects.{kind}.direction: {rule.direction!r} is not one of lower, higher")
        if not 0 < self.level < 1:
            raise CqilError(f"track.level: {self.level} must lie between 0 and 1")

    def rule(self, kind: str) -> Rule | None:
        given = self.min_effects.get(kind)
        return Rule(**given) if given else DEFAULT_RULES.get(kind)
