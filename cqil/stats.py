"""Uncertainty of the quality numbers: bootstrap intervals over questions, paired across variants.

    means = bootstrap_means(scores, iters=2000, seed=0)   # scores (questions, variants) -> (iters, variants)
    low, high = interval(means[:, 1] - means[:, 0])        # 95% interval of variant 1 minus variant 0

Every variant answers the same questions, so a difference is resampled *paired*: one draw of question
indices serves all the variants of a task, which removes the questions' own difficulty from the
interval. A difference is distinguishable from zero when its interval excludes 0. Tasks are resampled
independently of each other, so the mean over tasks of a per-task statistic gets its interval from the
same draws.
"""

from __future__ import annotations

import numpy as np


def bootstrap_means(scores: np.ndarray, iters: int, seed: int) -> np.ndarray:
    """Column means of `scores` (n, k) over `iters` resamples of its rows (with replacement): (iters, k)."""
    scores = np.asarray(scores, dtype=float)
    rows = np.random.default_rng(seed).integers(0, len(scores), size=(iters, len(scores)))
    return scores[rows].mean(axis=1)


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap draws (NaN draws, e.g. 0/0, are left out)."""
    draws = np.asarray(draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def excludes_zero(low: float, high: float) -> bool:
    return bool(low > 0 or high < 0)


def recovered(original: np.ndarray, zeroshot: np.ndarray, finetuned: np.ndarray) -> np.ndarray:
    """The fraction of the zero-shot loss that fine-tuning wins back: (finetuned - zeroshot) / (original - zeroshot).

    1: back to the original; 0: no better than zero-shot; elementwise, so it works on bootstrap draws. Where
    zero-shot lost nothing (original == zeroshot) there is nothing to recover: NaN, not an infinity.
    """
    loss = np.asarray(original, dtype=float) - zeroshot
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(loss == 0, np.nan, (np.asarray(finetuned) - zeroshot) / loss)
