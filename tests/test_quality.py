"""Intervals with known answers: the paired bootstrap, the share of the loss recovered, the quality table's rules."""

import json

import numpy as np
import pandas as pd
import pytest

from cqil.quality import QualitySettings, run_compare, run_quality
from cqil.stats import bootstrap_means, excludes_zero, interval, recovered
from cqil.tables import quality_table


def test_identical_answers_give_an_interval_of_only_zero():
    scores = np.random.default_rng(0).integers(0, 2, size=(300, 1)).repeat(2, axis=1)  # two variants, same answers
    draws = bootstrap_means(scores, iters=500, seed=0)
    assert interval(draws[:, 1] - draws[:, 0]) == (0.0, 0.0)
    assert not excludes_zero(0.0, 0.0)


def test_a_shifted_variant_is_distinguishable_and_the_interval_covers_the_shift():
    rng = np.random.default_rng(1)
    original = rng.integers(0, 2, size=600).astype(float)
    worse = original.copy()
    worse[rng.choice(np.flatnonzero(original == 1), size=30, replace=False)] = 0  # 5 points worse, paired
    draws = bootstrap_means(np.stack([original, worse], axis=1), iters=2000, seed=0)
    low, high = interval(draws[:, 1] - draws[:, 0])
    assert excludes_zero(low, high) and low < -0.05 < high < 0
    unpaired = interval(draws[:, 1] - bootstrap_means(original[:, None], iters=2000, seed=9)[:, 0])
    assert unpaired[1] - unpaired[0] > 2 * (high - low)  # pairing removes the questions' own difficulty


def test_bootstrap_is_seeded():
    scores = np.random.default_rng(2).random((50, 3))
    assert np.array_equal(bootstrap_means(scores, 100, seed=4), bootstrap_means(scores, 100, seed=4))
    assert not np.array_equal(bootstrap_means(scores, 100, seed=4), bootstrap_means(scores, 100, seed=5))


def test_recovered_is_the_share_of_the_zero_shot_loss_won_back():
    assert recovered(60.0, 50.0, 55.0) == 0.5 and recovered(60.0, 50.0, 60.0) == 1.0
    assert recovered(10.0, 20.0, 12.0) == pytest.approx(0.8)  # perplexity: lower is better, the same formula
    assert np.isnan(interval(np.array([np.nan, np.nan]))[0])  # 0/0 draws are left out
    assert np.isnan(recovered(50.0, 50.0, 55.0))  # zero-shot lost nothing: nothing to recover, not an infinity


def evaluation(path, plan, stage, answers):
    """An eval JSON as `cqil evaluate` writes it: per task, every question's acc and acc_norm."""
    items = {
        task: {
            "doc_id": list(range(len(a))),
            "choices": [choices] * len(a),
            "acc": list(map(float, a)),
            "acc_norm": list(map(float, a)),
        }
        for task, (choices, a) in answers.items()
    }
    items["wikitext2"] = {
        "doc_id": [0, 1, 2, 3],
        "nll": [2.0, 2.1, 1.9, 2.0] if stage == "original" else [2.5, 2.6, 2.4, 2.5],
        "tokens": [511] * 4,
    }
    path.write_text(json.dumps({"plan": plan, "stage": stage, "results": {}, "items": items}))
    return str(path)


def test_the_quality_table_pairs_variants_and_averages_only_the_tasks_above_chance(tmp_path):
    rng = np.random.default_rng(3)
    easy = (rng.random(400) < 0.7).astype(int)  # 70% on 4 choices: far above chance
    coin = (rng.random(400) < 0.5).astype(int)  # 50% on 2 choices: chance
    worse = easy.copy()
    worse[np.flatnonzero(easy)[:40]] = 0  # zero-shot: 10 points lost on the easy task
    half = worse.copy()
    half[np.flatnonzero(easy)[:20]] = 1  # fine-tuned: half of it back
    inputs = [
        evaluation(tmp_path / "o.json", "original", "original", {"easy_local": (4, easy), "coin_local": (2, coin)}),
        evaluation(tmp_path / "z.json", "S2-E6-P2-D0", "zeroshot", {"easy_local": (4, worse), "coin_local": (2, coin)}),
        evaluation(tmp_path / "f.json", "S2-E6-P2-D0", "finetuned", {"easy_local": (4, half), "coin_local": (2, coin)}),
    ]
    (tmp_path / "scores.json").write_text(
        json.dumps(
            {
                "plan": {"plan": "S2-E6-P2-D0", "ideal_reduction": 0.25},
                "original": {"kl": 0.0, "perplexity": 5.0, "top1": 1.0},
            }
        )
    )
    run_quality(
        QualitySettings(bootstrap=1000),
        inputs,
        out=tmp_path / "quality.csv",
        scores=[tmp_path / "scores.json"],
        figure=tmp_path / "tradeoff",
    )
    levels, diffs = pd.read_csv(tmp_path / "quality.csv"), pd.read_csv(tmp_path / "quality_diff.csv")
    above = levels[levels.stage == "original"].set_index("task").above_chance
    assert above["easy_local"] and not above["coin_local"]
    d = diffs.set_index(["stage", "task"])
    assert d.loc[("zeroshot", "easy_local"), "diff"] == pytest.approx(-10.0)
    assert d.loc[("zeroshot", "easy_local"), "distinguishable"]
    assert d.loc[("zeroshot", "coin_local"), "diff"] == 0 and not d.loc[("zeroshot", "coin_local"), "distinguishable"]
    assert d.loc[("zeroshot", "average"), "diff"] == pytest.approx(-10.0)  # the coin task is left out of the mean
    assert d.loc[("finetuned", "average"), "recovered"] == pytest.approx(0.5)
    low, high = d.loc[("finetuned", "average"), ["recovered_low", "recovered_high"]]
    assert low < 0.5 < high
    assert np.isnan(d.loc[("finetuned", "coin_local"), "recovered"])  # no zero-shot loss there to recover
    assert d.loc[("zeroshot", "wikitext2"), "diff"] == pytest.approx(np.exp(2.5) - np.exp(2.0))
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    numbers, written = quality_table(levels, diffs, "m")
    row = written.set_index("stage").loc["zeroshot"]
    assert row["easy acc_norm diff"].startswith("-10.0 [") and row["easy acc_norm diff"].endswith("]*")
    assert written.set_index("stage").loc["finetuned", "recovered"].startswith("50% [")
    assert numbers.set_index("stage").loc["zeroshot", "average accuracy diff"] == pytest.approx(-10.0)


def test_two_evaluations_of_the_same_questions_compare_directly(tmp_path):
    """The KD-data ablation's comparison: one plan fine-tuned on two corpora, b minus a, paired."""
    rng = np.random.default_rng(4)
    easy = (rng.random(400) < 0.7).astype(int)
    coin = (rng.random(400) < 0.5).astype(int)
    worse, better = easy.copy(), easy.copy()
    worse[np.flatnonzero(easy)[:40]] = 0
    better[np.flatnonzero(easy)[:20]] = 0
    paths = [
        evaluation(
            tmp_path / f"{name}.json",
            "S2-E6-P2-D0" if name != "o" else "original",
            "finetuned" if name != "o" else "original",
            {"easy_local": (4, a), "coin_local": (2, coin)},
        )
        for name, a in (("o", easy), ("a", worse), ("b", better))
    ]
    run_compare(original=paths[0], a=paths[1], b=paths[2], out=tmp_path / "compare.csv", bootstrap=1000)
    found = pd.read_csv(tmp_path / "compare.csv").set_index("task")
    assert found.loc["easy_local", "diff"] == pytest.approx(5.0) and found.loc["easy_local", "distinguishable"]
    assert found.loc["coin_local", "diff"] == 0 and not found.loc["coin_local", "above_chance"]
    assert found.loc["average", "diff"] == pytest.approx(5.0)  # the coin task is not averaged
    assert found.loc["easy_local", "n"] == 400 and found.loc["average", "n"] == 400  # questions both answered
