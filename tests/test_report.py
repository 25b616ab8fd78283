"""The paper's tables, built from small fixture artifacts: expected cells, official numbers beside ours."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from cqil.cli import main
from cqil.tables import OFFICIAL, latency_summary, quality_table

PAPER = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "paper.yaml").read_text())


def quality_rows():
    """quality.csv (levels, accuracy in points) and quality_diff.csv of a 7B run, as `cqil quality` writes them."""
    levels = pd.DataFrame(
        [
            ("original", "original", "heldout", "kl", 0.0),
            ("original", "original", "arc_easy_local", "acc", 70.0),
            ("original", "original", "sciq", "acc", 93.1),
            ("S12-E30-P2-D0", "zeroshot", "heldout", "kl", 0.4),
            ("S12-E30-P2-D0", "zeroshot", "arc_easy_local", "acc", 60.0),
            ("S12-E30-P2-D0", "zeroshot", "sciq", "acc", 90.0),
            ("S12-E30-P2-D0", "finetuned", "heldout", "kl", 0.2),
            ("S12-E30-P2-D0", "finetuned", "arc_easy_local", "acc", 69.0),
            ("S12-E30-P2-D0", "finetuned", "sciq", "acc", 92.0),
        ],
        columns=["plan", "stage", "task", "metric", "value"],
    )
    diffs = pd.DataFrame(
        [
            ("S12-E30-P2-D0", "zeroshot", "arc_easy_local", "acc", -10.0, -14.0, -6.0, True, None, None, None),
            ("S12-E30-P2-D0", "zeroshot", "sciq", "acc", -3.1, -5.0, -1.2, True, None, None, None),
            ("S12-E30-P2-D0", "zeroshot", "average", "accuracy", -6.55, -9.0, -4.0, True, None, None, None),
            ("S12-E30-P2-D0", "finetuned", "arc_easy_local", "acc", -1.0, -3.0, 1.0, False, 0.9, 0.6, 1.1),
            ("S12-E30-P2-D0", "finetuned", "sciq", "acc", -1.1, -2.0, -0.2, True, 0.65, 0.3, 0.9),
            ("S12-E30-P2-D0", "finetuned", "average", "accuracy", -1.05, -2.2, 0.1, False, 0.84, 0.6, 1.0),
        ],
        columns=[
            "plan",
            "stage",
            "task",
            "metric",
            "diff",
            "low",
            "high",
            "distinguishable",
            "recovered",
            "recovered_low",
            "recovered_high",
        ],
    )
    diffs["value"] = [60.0, 90.0, 75.0, 69.0, 92.0, 80.5]
    diffs["original"] = [70.0, 93.1, 81.55, 70.0, 93.1, 81.55]
    return levels, diffs


def test_quality_table_puts_differences_with_intervals_and_the_official_numbers_beside_ours():
    numbers, written = quality_table(*quality_rows(), "llama-7b")
    written, numbers = written.set_index(["plan", "stage"]), numbers.set_index(["plan", "stage"])
    assert list(written.columns) == [
        "model",
        "arc_easy acc",
        "arc_easy acc official",
        "arc_easy acc diff",
        "sciq acc",
        "sciq acc official",
        "sciq acc diff",
        "average accuracy",
        "average accuracy diff",
        "recovered",
        "heldout kl",
    ]
    assert written.loc[("original", "original"), "arc_easy acc official"] == "72.9"  # the official README's
    assert written.loc[("S12-E30-P2-D0", "zeroshot"), "arc_easy acc diff"] == "-10.0 [-14.0, -6.0]*"
    assert written.loc[("S12-E30-P2-D0", "finetuned"), "arc_easy acc diff"] == "-1.0 [-3.0, +1.0]"  # 0 inside: no *
    assert written.loc[("S12-E30-P2-D0", "finetuned"), "recovered"] == "84% [60, 100]"
    assert written.loc[("S12-E30-P2-D0", "zeroshot"), "arc_easy acc official"] == ""  # the README has no zero-shot
    assert numbers.loc[("S12-E30-P2-D0", "finetuned"), "sciq acc diff high"] == -0.2
    assert numbers.loc[("S12-E30-P2-D0", "finetuned"), "heldout kl"] == 0.2
    assert "arc_easy acc official" not in quality_table(*quality_rows(), "smollm2-135m")[1].columns  # none published


def test_the_published_numbers_are_keyed_by_the_paper_configs_plans_and_tasks():
    """Each published row is a plan the paper config runs (D1 in the official code's arithmetic) and each number a
    task it evaluates (MMLU 5-shot), so every one of them lands beside ours."""
    plans = {"original", *PAPER["catalog"]["llama-7b"]["plans"]}
    tasks = {task.removesuffix("_local") for task in PAPER["evaluate"]["tasks"]}
    assert all(plan in plans and set(numbers) == tasks for (plan, _), numbers in OFFICIAL["llama-7b"].items())
    d1 = ("S12-E30-P2-D1-official", "finetuned")
    levels = pd.DataFrame(
        [("original", "original", "mmlu_5shot", "acc", 35.0), (*d1, "mmlu_5shot", "acc", 32.0)],
        columns=["plan", "stage", "task", "metric", "value"],
    )
    diffs = pd.DataFrame(
        [(*d1, "mmlu_5shot", "acc", -3.0, -4.0, -2.0, True, 32.0, 35.0)],
        columns=["plan", "stage", "task", "metric", "diff", "low", "high", "distinguishable", "value", "original"],
    )
    written = quality_table(levels, diffs, "llama-7b")[1].set_index(["plan", "stage"])
    assert written.loc[d1, "mmlu_5shot acc official"] == "32.5" and written.loc[d1, "mmlu_5shot acc"] == "32.0"
    assert written.loc[("original", "original"), "mmlu_5shot acc official"] == "35.1"


def test_latency_summary_marks_measured_and_predicted():
    measured = pd.DataFrame(
        {
            "setup": [
                "original, 1 thread",
                "original, 2 threads",
                "cqil S2-E6-P2-D0",
                "original, 4 threads",
            ],  # thread scaling (any count) stays in latency.csv
            "model": "m",
            "phase": "prefill",
            "tokens": 16,
            "median_ms": [100.0, 60.0, 80.0, 40.0],
            "reduction": [0, 0.4, 0.2, 0.6],
            "ideal": [0, 0.5, 0.25, 0.75],
            "of_ideal": [None, 0.8, 0.8, 0.8],
        }
    )
    predicted = pd.DataFrame(
        {
            "shape": "llama-7b",
            "hardware": "A100-80GB/nccl",
            "setup": ["original", "tp 2"],
            "phase": "decode",
            "tokens": 1,
            "ms": [9.5, 7.5],
            "reduction": [0.0, 0.21],
            "ideal": [0.0, 0.5],
            "paper": None,
        }
    )
    table = latency_summary([measured], predicted)
    assert table.setup.tolist() == ["original, 1 thread", "cqil S2-E6-P2-D0", "original", "tp 2"]
    assert table.source.tolist() == ["measured (this CPU)"] * 2 + ["predicted (A100-80GB/nccl)"] * 2
    assert table.ms.tolist() == [100.0, 80.0, 9.5, 7.5] and table.of_ideal.iloc[3] == pytest.approx(0.42)


def test_tables_cli_writes_csv_markdown_latex(tmp_path):
    levels, diffs = quality_rows()
    levels.to_csv(tmp_path / "quality.csv", index=False)
    diffs.to_csv(tmp_path / "quality_diff.csv", index=False)  # found beside quality.csv
    main(["tables", "--quality", f"llama-7b={tmp_path / 'quality.csv'}", "--out-dir", str(tmp_path / "tables")])
    for kind in ("csv", "md", "tex"):
        assert (tmp_path / "tables" / f"quality.{kind}").stat().st_size > 100
    assert "\\begin{tabular}" in (tmp_path / "tables" / "quality.tex").read_text()
    assert "72.9" in (tmp_path / "tables" / "quality.md").read_text()
    assert "-10.0 [-14.0, -6.0]*" in (tmp_path / "tables" / "quality.tex").read_text()
