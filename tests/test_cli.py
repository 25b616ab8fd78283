"""The command line on a tiny saved model: output, and one-line errors with exit status 2."""

import subprocess
import sys

import pytest

from cqil.cli import main

WORDS = " ".join(f"w{(7 * i) % 92}" for i in range(300))


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_entry_point_help():
    out = subprocess.run(["cqil", "ppl", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--plan" in out and "S18-E28-P2-D0" in out
    out = subprocess.run([sys.executable, "-m", "cqil", "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in out and "generate" in out


def test_info(capsys, tiny_dir):
    code, out, _ = run(capsys, "info", str(tiny_dir))
    assert code == 0 and "family           llama" in out and "layers           8" in out


def test_ppl_reports_original_and_plan(capsys, tiny_dir, tmp_path):
    (tmp_path / "text.txt").write_text(WORDS)
    code, out, _ = run(
        capsys,
        "ppl",
        "--model",
        str(tiny_dir),
        "--plan",
        "S0-E8-P4-D1",
        "--text",
        str(tmp_path / "text.txt"),
        "--block-size",
        "64",
    )
    rows = [line.split() for line in out.strip().splitlines()[1:]]
    assert code == 0 and [r[0] for r in rows] == ["original", "S0-E8-P4-D1"]
    assert rows[0][1] == rows[1][1] == "295"  # 300 tokens in 5 blocks of 64 and one of 44: 300 - 5 predictions
    assert float(rows[0][2]) != float(rows[1][2])


def test_generate(capsys, tiny_dir):
    code, out, _ = run(
        capsys, "generate", "--model", str(tiny_dir), "--plan", "S2-E6-P2-D0", "w1 w2 w3", "--max-new-tokens", "4"
    )
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].startswith("[original] w1 w2 w3") and lines[1].startswith("[S2-E6-P2-D0] w1 w2 w3")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ppl", "--plan", "S2-E5-P2-D0", "--text", "x"], "E-S=3 must be a multiple of P=2"),
        (["ppl", "--plan", "P2", "--text", "x"], "expected the form S12-E30-P2-D0"),
        (["ppl", "--plan", "S2-E12-P2-D0", "--text", "TEXT"], "E=12 exceeds the model's 8 layers"),
        (["ppl", "--text", "missing.txt"], "--text 'missing.txt': file not found"),
        (["info", "nonexistent-model"], "not an embedded model"),
    ],
)
def test_bad_input_is_one_line(capsys, tiny_dir, tmp_path, argv, message):
    (tmp_path / "text.txt").write_text(WORDS)
    argv = [str(tmp_path / "text.txt") if a == "TEXT" else a for a in argv]
    if argv[0] == "ppl":
        argv += ["--model", str(tiny_dir)]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("cqil: error: ") and message in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapter", "somewhere"], "--adapter needs --plan"),
        (
            ["--settings", '{"tasks": ["arc_easy_local"], "data_dir": null}'],
            "evaluate.tasks[0]: arc_easy_local needs evaluate.data_dir",
        ),
        (["--settings", '{"data_dir": "nowhere"}'], "evaluate.data_dir: 'nowhere' is not a directory"),
        (
            ["--settings", '{"task": ["arc_easy_local"]}'],
            "evaluate.task: not a setting of this stage (allowed: data_dir, tasks, questions",
        ),
        (["--settings", "{tasks"], "--settings: not valid JSON"),
    ],
)
def test_evaluate_input_is_checked_before_loading(capsys, tiny_dir, tmp_path, argv, message):
    out = str(tmp_path / "x.json")  # were a case to pass the checks, its evaluation must not land in the checkout
    code, _, err = run(capsys, "evaluate", "--model", str(tiny_dir), "--corpus", "corpus.pt", "--out", out, *argv)
    assert code == 2 and err.count("\n") == 1 and message in err
