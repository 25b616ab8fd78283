"""Is a benchmark change real? A verdict per metric from what two records measured, and change points in a history.

    verdict(old, new, Rule("lower", 0.05))    # -> Verdict(status="regressed", change=0.11, p=0.008, ...)
    change_points([1.0, 1.1, 0.9, 1.0, 1.3, 1.4, 1.3])   # -> [4]: the level shifts before the 5th value

A metric moved when its change is larger than the rule's minimum effect (what a user cares about) *and*
larger than the noise of the measurement (what the machine makes up). The noise comes from what the
records carry, first that applies:
- samples (the repeats of a same-run ratio, a latency reduction against its interleaved baseline): a two-sided
  Mann-Whitney U test of the two sets of repeats; it assumes no distribution, and one slow repeat cannot decide
  it. The change is then its companion estimate, the Hodges-Lehmann shift (the median of all new/old pairwise
  ratios, or differences), which is steadier than the difference of two medians of 5. Not for a rule that
  `drifts` (a raw latency in ms): its repeats in one run agree closely while two runs on one machine differ by
  far more (docs/tracking.md), so a test of one run's repeats against another's calls that drift a change;
- an interval (quality: a bootstrap interval over questions): a z-test of the difference, each standard
  error read off its interval as (high - low) / (2 z);
- neither (or a rule that drifts), for a timing (a rule with `timed`: a wall time measured once, a raw latency):
  the history's spread, where it has 3 or more comparable records, as the noise of each value (a z-test);
  without it the change cannot be told from noise and is at most *inconclusive*;
- neither, for a computed value (held-out KL on fixed blocks): it is exact, and a change beyond the minimum
  effect counts.
The history can raise the minimum effect to twice the metric's spread over the last records of the same
config on the same machine: run-to-run noise (a different core placement, a warmer machine) that the
repeats inside one run do not see.

Statuses: `regressed` / `improved` (beyond the minimum effect and significant at `level`), `unchanged`
(within the minimum effect), `inconclusive` (beyond it, but not distinguishable from the noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Rule:
    direction: str  # lower | higher: which way is better
    min_effect: float  # the smallest change ever called, either way ...
    relative: bool = True  # ... as a fraction of the old value, or in the metric's own units
    timed: bool = False  # a timing: never exact, so without repeats or history it is at most inconclusive
    drifts: bool = False  # its repeats in one run do not see the run-to-run drift: judged by the history only


@dataclass(frozen=True)
class Measurement:
    value: float
    samples: tuple = ()  # the raw repeats, where there are several
    interval: tuple | None = None  # (low, high) at the run's quality level


@dataclass(frozen=True)
class Verdict:
    status: str  # regressed | improved | unchanged | inconclusive
    change: float  # new - old (with samples: their shift), as a fraction of old where the rule is relative
    p: float | None  # the test's two-sided p-value; None where the value is exact
    noise: str  # samples | interval | history | exact | none: where the p-value came from
    min_effect: float  # the one applied: the rule's, or twice the history's spread where that is larger


def p_value(
    old: Measurement, new: Measurement, level: float, rule: Rule, spread: float | None = None
) -> tuple[float | None, str]:
    """Two-sided p-value of new against old, and which noise it rests on (None: an exact value)."""
    if len(old.samples) >= 2 and len(new.samples) >= 2 and not rule.drifts:
        return float(stats.mannwhitneyu(new.samples, old.samples, alternative="two-sided").pvalue), "samples"
    if old.interval and new.interval:
        z = stats.norm.ppf(0.5 + level / 2)
        se = np.hypot(*[(high - low) / (2 * z) for low, high in (old.interval, new.interval)])
        if se > 0:
            return float(2 * stats.norm.sf(abs(new.value - old.value) / se)), "interval"
    if not rule.timed:
        return None, "exact"
    if spread:  # each value as noisy as the history's values
        return float(2 * stats.norm.sf(abs(new.value - old.value) / (spread * np.sqrt(2)))), "history"
    return 1.0, "none"


def shift(old, new, relative: bool) -> float:
    """The Hodges-Lehmann shift of `new` against `old`: the median of all pairwise ratios minus 1 (`relative`),
    or of all pairwise differences."""
    old, new = np.asarray(old, dtype=float), np.asarray(new, dtype=float)
    if relative:
        return float(np.expm1(np.median(np.log(new[:, None] / old[None, :]))))
    return float(np.median(new[:, None] - old[None, :]))


def verdict(old: Measurement, new: Measurement, rule: Rule, level: float = 0.95, spread: float | None = None):
    """The verdict on one metric; `spread`: its standard deviation over earlier records (the history), if known."""
    relative = rule.relative and bool(old.value)  # relative to 0 is undefined: absolute then
    scale = abs(old.value) if relative else 1.0
    p, noise = p_value(old, new, level, rule, spread)
    change = shift(old.samples, new.samples, relative) if noise == "samples" else (new.value - old.value) / scale
    min_effect = max(rule.min_effect, 2 * spread / scale if spread else 0.0)
    if abs(change) <= min_effect:
        status = "unchanged"
    elif p is not None and p >= 1 - level:
        status = "inconclusive"
    else:
        worse = change > 0 if rule.direction == "lower" else change < 0
        status = "regressed" if worse else "improved"
    return Verdict(status, float(change), p, noise, float(min_effect))


# --- Change points in a history ----------------------------------------------------------------------


def split_statistics(series: np.ndarray, min_size: int) -> np.ndarray:
    """For series (..., n): |mean before - mean after| / its standard error (pooled), for every split k in
    [min_size, n - min_size] (before = [:k]); -1 where a split is not allowed."""
    n = series.shape[-1]
    k = np.arange(1, n)
    total, squares = np.cumsum(series, -1), np.cumsum(series**2, -1)
    before, after = total[..., :-1] / k, (total[..., -1:] - total[..., :-1]) / (n - k)
    within = squares[..., -1:] - k * before**2 - (n - k) * after**2  # sum of squares around each side's mean
    error = np.sqrt(np.maximum(within, 0) / max(n - 2, 1) * (1 / k + 1 / (n - k)))
    scale = np.abs(series).max(-1, keepdims=True) + 1e-300
    statistic = np.abs(before - after) / (error + 1e-9 * scale)  # a flat series with one step: large, not inf
    return np.where((k >= min_size) & (n - k >= min_size), statistic, -1.0)


def change_points(
    values, *, level: float = 0.99, min_size: int = 3, permutations: int = 999, seed: int = 0
) -> list[int]:
    """Indices i where the series' level shifts between values[:i] and values[i:], by binary segmentation.

    In a segment, the split with the largest statistic (`split_statistics`) is a change point when fewer than
    1 - level of random shuffles of that segment reach a statistic that large (a permutation test: it holds
    whatever the noise's distribution); then both sides are searched again. Segments shorter than 2 * min_size
    are not split.
    """
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    found = []

    def search(start: int, stop: int) -> None:
        segment = values[start:stop]
        if len(segment) < 2 * min_size:
            return
        observed = split_statistics(segment, min_size)
        split = int(observed.argmax())
        shuffled = rng.permuted(np.broadcast_to(segment, (permutations, len(segment))), axis=1)
        null = split_statistics(shuffled, min_size).max(-1)
        if (1 + np.sum(null >= observed[split])) / (1 + permutations) < 1 - level:
            found.append(start + split + 1)
            search(start, start + split + 1)
            search(start + split + 1, stop)

    search(0, len(values))
    return sorted(found)
