"""The lock: the README's commands, .ci/run and environment.yml install it, and this environment is it."""

import re
from pathlib import Path

import pytest
import tomllib
import yaml

from cqil.tracking.environment import LOCK, canonical, changes, drift, installed, locked

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def readme_commands() -> list[str]:
    """The bash blocks of the README's *Two commands* section: run the pipeline, run the tests, then others."""
    section = (ROOT / "README.md").read_text().split("## Two commands")[1].split("\n## ")[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_the_install_commands_use_the_lock():
    run, test = readme_commands()[:2]  # the third regenerates the lock
    assert (
        "pip install -r requirements.lock.txt -e ." in run
        and "pip install -r requirements.lock.txt -e '.[test]'" in test
    )
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == test  # CI runs the README's command
    conda = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    assert f"python={PYPROJECT['tool']['uv']['pip']['python-version']}" in conda
    assert next(item["pip"] for item in conda if isinstance(item, dict))[0] == "-r requirements.lock.txt"
    header = LOCK.read_text().splitlines()[1].strip("# ")
    assert header == PYPROJECT["tool"]["uv"]["pip"]["custom-compile-command"]  # made by the documented command


def test_the_lock_pins_the_cpu_build_of_torch():
    pins = locked()
    torch = PYPROJECT["tool"]["uv"]["dependency-metadata"][0]
    assert pins["torch"] == torch["version"]  # the CPU wheel's metadata is the one the lock was resolved with
    assert not [name for name in pins if name.startswith(("nvidia-", "cuda-", "triton"))]
    declared = {re.split(r"[<>=\[; ]", spec)[0] for spec in PYPROJECT["project"]["dependencies"]}
    assert declared <= set(pins)


@pytest.mark.lock
def test_this_environment_is_the_lock():
    found = drift(locked(), installed())
    assert not found, f"this environment differs from requirements.lock.txt (name, locked, installed): {found}"


def test_drift_and_changes():
    lock = {"torch": "2.13.0", "transformers": "5.23.0", "numpy": "2.4.6"}
    have = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "tokenizers": "0.23.1", "pip": "23.2.1", "cqil": "0.1.0"}
    assert drift(lock, have) == [
        ("numpy", "2.4.6", None),
        ("tokenizers", None, "0.23.1"),
        ("transformers", "5.23.0", "5.24.0"),
    ]  # torch's +cpu build is its release
    assert changes(lock, have, both_complete=False) == ["torch 2.13.0 -> 2.13.0+cpu", "transformers 5.23.0 -> 5.24.0"]
    assert canonical("lm_eval") == canonical("LM.Eval") == "lm-eval"  # pip's name comparison (PEP 503)
