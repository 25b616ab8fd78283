"""The paper's tables, built from small fixture artifacts: expected cells, official numbers beside ours."""

import pandas as pd
import pytest

from cqil.cli import main
from cqil.report import latency_summary, quality_table


def quality_rows():
    rows = [
        ("original", "original", "heldout", "kl", 0.0),
        ("original", "original", "arc_easy_local", "acc", 0.70),
        ("original", "original", "sciq", "acc", 0.931),
        ("S12-E30-P2-D0", "zeroshot", "heldout", "kl", 0.4),
        ("S12-E30-P2-D0", "zeroshot", "arc_easy_local", "acc", 0.6),
        ("S12-E30-P2-D0", "finetuned", "heldout", "kl", 0.2),
        ("S12-E30-P2-D0", "finetuned", "arc_easy_local", "acc", 0.69),
        ("S12-E30-P2-D0", "finetuned", "arc_easy_local", "acc_norm", 0.5),
    ]  # not a table metric
    return pd.DataFrame(rows, columns=["plan", "stage", "task", "metric", "value"])


def test_quality_table_puts_the_official_numbers_beside_ours():
    table = quality_table(quality_rows(), "llama-7b").set_index(["plan", "stage"])
    assert list(table.columns) == [
        "model",
        "heldout kl",
        "arc_easy_local acc",
        "arc_easy official",
        "arc_easy diff",
        "sciq acc",
        "sciq official",
        "sciq diff",
    ]
    assert table.loc[("original", "original"), "arc_easy_local acc"] == pytest.approx(70.0)
    assert table.loc[("original", "original"), "arc_easy official"] == 72.9
    assert table.loc[("S12-E30-P2-D0", "finetuned"), "arc_easy diff"] == pytest.approx(69.0 - 70.1)
    assert pd.isna(table.loc[("S12-E30-P2-D0", "zeroshot"), "arc_easy official"])  # the README has no zero-shot
    assert table.loc[("S12-E30-P2-D0", "finetuned"), "heldout kl"] == 0.2
    # a model without published numbers gets no official columns
    assert "arc_easy official" not in quality_table(quality_rows(), "smollm2-135m").columns


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
    quality_rows().to_csv(tmp_path / "quality.csv", index=False)
    main(["tables", "--quality", f"llama-7b={tmp_path / 'quality.csv'}", "--out-dir", str(tmp_path / "tables")])
    for kind in ("csv", "md", "tex"):
        assert (tmp_path / "tables" / f"quality.{kind}").stat().st_size > 100
    assert "\\begin{tabular}" in (tmp_path / "tables" / "quality.tex").read_text()
    assert "72.9" in (tmp_path / "tables" / "quality.md").read_text()
