"""`snakemake --cores all --profile slurm` against a real one-node SLURM that the fixture starts here.

tests/slurm/start.sh starts munged, slurmctld and slurmd on localhost with 2 fake GPUs (about a second;
it needs root and Debian's slurm-wlm and munge, which the README's test command installs); stop.sh stops
them by their pid files and puts back the /etc/slurm files that start.sh replaced (the fixture checks).
tests/profiles/slurm-ci is layered over profiles/slurm: squeue for job status (no accounting database
here) and short polling. The runs happen in a copy of the checkout; each is bounded by a timeout that kills.
What the paper's run would submit is read without a cluster: its dry-run's jobs, through the plugin's own
functions that build an sbatch line (docs/cluster.md shows them).
"""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from conftest import ROOT, checkout_copy
from snakemake_executor_plugin_slurm.submit_string import get_submit_command
from snakemake_executor_plugin_slurm.utils import set_gres_string

from cqil.config import merged
from cqil.plan import Setup

pytestmark = pytest.mark.slurm
SMALL = ["--configfile", "tests/data/small.yaml"]
SLURM = ["--profile", "slurm", "--profile", "tests/profiles/slurm-ci"]  # `slurm` resolves to ./slurm -> profiles/slurm
ETC = [Path("/etc/slurm") / name for name in ("slurm.conf", "gres.conf")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return checkout_copy(tmp_path_factory.mktemp("repo"))


def snakemake(repo, *args, timeout=900):
    return subprocess.run(["snakemake", *args], cwd=repo, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        pytest.skip("needs root and Debian's slurm-wlm and munge (the README's test command installs them)")
    env = {**os.environ, "SLURM_CI_DIR": str(tmp_path_factory.mktemp("slurm")), "SLURM_CI_NGPU": "2"}
    before = [path.read_bytes() if path.exists() else None for path in ETC]
    try:  # stop.sh also runs when start.sh fails half-way: nothing of ours outlives the tests
        subprocess.run(["bash", "tests/slurm/start.sh"], cwd=ROOT, env=env, check=True, timeout=60)
        yield
    finally:
        subprocess.run(["bash", "tests/slurm/stop.sh"], cwd=ROOT, env=env, timeout=120)
        assert [path.read_bytes() if path.exists() else None for path in ETC] == before, "/etc/slurm was not restored"


class Resources(dict):
    """A planned job's resources as the plugin reads them: `.get(name)` and `.name`."""

    __getattr__ = dict.__getitem__


def planned_jobs(output: str) -> list[SimpleNamespace]:
    """Every job a dry-run (with -p) printed: rule, wildcards, threads, resources and shell command."""
    jobs = []
    for block in re.split(r"\n(?=(?:localrule|rule|checkpoint) \w+:\n)", output)[1:]:
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.M))
        resources = {
            key: int(value) if value.isdigit() else value
            for key, value in re.findall(r"(\w+)=([^,]+)", fields.get("resources", ""))
        }
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append(
            SimpleNamespace(
                rule=block.split()[1].rstrip(":"),
                wildcards=dict(re.findall(r"(\w+)=([^,]+)", fields.get("wildcards", ""))),
                threads=int(fields.get("threads", 1)),
                resources=Resources(resources),
                shell=shell[1] if shell and shell[1] != "None" else "",  # `all` runs no command
            )
        )
    return jobs


def submit_line(job) -> str:
    """The sbatch line snakemake-executor-plugin-slurm builds for a job (its job name, log and comment left out)."""
    params = dict(
        run_uuid="-",
        slurm_logfile="-",
        comment_str="-",
        account="",
        workdir="",
        partition=f" -p {job.resources['slurm_partition']}",
    )
    call = get_submit_command(job, params) + set_gres_string(job)
    return "sbatch " + call.split("--comment -", 1)[1].strip()


def paper_plan(repo, tmp_path) -> list[SimpleNamespace]:
    """The jobs of the paper's run under the SLURM profile: a dry-run, and a second one past the plan selection
    (the selected plans stood in by each model's catalog plans) for the jobs the selection adds. A fake `sbatch`
    first on PATH records any call: a dry-run submits nothing."""
    (tmp_path / "bin").mkdir()
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch-calls\nexit 1\n')
    sbatch.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    command = ["snakemake", "-n", "--cores", "all", "--profile", "slurm", "--configfile", "config/paper.yaml"]

    def dry_run():
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return planned_jobs(result.stdout)

    before = dry_run()
    config = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    made = [  # what the jobs up to `select` write, in order: each file older than those made from it
        ["results/{run}/model.json"],
        ["resources/{run}/corpus.pt", "results/{run}/corpus.json"],
        [
            f"results/{{run}}/{stage}.{kind}"
            for stage in ("similarity", "sensitivity", "search")
            for kind in ("csv", "json")
        ],
        ["results/{run}/selected.json"],
    ]
    for age, patterns in enumerate(made):
        for model in config["models"]:
            for pattern in patterns:
                path = repo / pattern.format(run=f"paper/{model}")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"plans": config["catalog"][model].get("plans", [])}))
                os.utime(path, (time.time() - 100 + age,) * 2)
    after = dry_run()
    assert not (tmp_path / "sbatch-calls").exists()
    return before + [job for job in after if job.rule not in {job.rule for job in before}]


def submit_table(jobs) -> str:
    """docs/cluster.md's table: one row per rule and submit line, with its count of jobs."""
    rows = {}
    for job in jobs:
        if job.shell:  # `all` submits nothing
            key = job.rule, submit_line(job)
            rows[key] = rows.get(key, 0) + 1
    lines = ["| rule | jobs | submit line |", "|---|---|---|"]
    lines += [f"| {rule} | {count} | `{line}` |" for (rule, line), count in sorted(rows.items())]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def paper_jobs(repo, tmp_path_factory):
    return paper_plan(repo, tmp_path_factory.mktemp("paper"))


def test_the_paper_run_asks_slurm_for_what_its_config_says(paper_jobs):
    """Each job of `snakemake --cores all --profile slurm --configfile config/paper.yaml` asks for the config's CPUs
    (not the cores of the host that submits them), GPUs (one per rank of a latency setup), memory and time; GPU jobs run
    offline, after the CPU jobs that download; torchrun's ranks share the job's threads."""
    default, paper = (yaml.safe_load((ROOT / "config" / name).read_text()) for name in ("config.yaml", "paper.yaml"))
    resources = merged(default, paper)["resources"]  # as Snakemake merges them: paper.yaml is a diff
    jobs = [job for job in paper_jobs if job.shell]
    assert {"prepare_model", "prepare_tasks", "corpus", "search", "score", "finetune", "evaluate"} <= {
        job.rule for job in jobs
    }
    for job in jobs:
        line, entry = submit_line(job), {**resources["default"], **resources.get(job.rule, {})}
        if job.rule in ("corpus", "similarity", "sensitivity", "search", "score", "baselines", "evaluate", "finetune"):
            assert " --device auto " in job.shell, job.shell  # latency's: test_workflow.py
        if job.rule in ("prepare_model", "prepare_tasks", "corpus"):
            assert " -p cpu " in line and "--gpus" not in line and "HF_HUB_OFFLINE" not in job.shell, line
        if job.rule in resources:
            assert f"--mem {entry['mem_mb']} " in line and f"-t {entry['runtime']} " in line, line
            assert f"--cpus-per-task={entry['threads']}" in line, line
        gpus = Setup.parse(job.wildcards["setup"]).ranks if job.rule == "latency" else entry["gpu"]
        if job.rule in resources and gpus:
            assert line.endswith(f" --gpus={gpus}") and " -p gpu " in line, line
            assert job.shell.startswith("HF_HUB_OFFLINE=1 "), job.shell  # the weights are on disk by now
    # 4 ranks share the job's threads: 32 / 4 where the job runs (the dry-run here has its 2 cores: 1 each)
    for job in (job for job in jobs if job.rule == "finetune"):
        launcher = f"torchrun --standalone --nproc_per_node 4 -m cqil --threads {max(1, job.threads // 4)} finetune"
        assert launcher in job.shell and "--cpus-per-task=32 " in submit_line(job)


def test_the_cluster_docs_show_the_paper_runs_submit_lines(paper_jobs):
    expected = submit_table(paper_jobs)
    assert expected in (ROOT / "docs" / "cluster.md").read_text(), f"docs/cluster.md's table is now:\n{expected}"


def test_the_profile_resolves_from_the_repository_root(repo):
    """The users' literal command finds the profile (./slurm links to profiles/slurm) and plans SLURM jobs."""
    result = snakemake(repo, "-n", *SMALL, "--config", "run=slurmdry", "--profile", "slurm", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Using profiles slurm" in result.stdout + result.stderr and "slurm_partition=cpu" in result.stdout


def test_a_small_target_through_slurm_matches_a_local_run(slurm, repo, tmp_path):
    """Similarity of the default model, and a CQIL latency job asking for 2 GPUs on the gpu partition."""
    (tmp_path / "gpus.yaml").write_text(  # 1 thread: fewer than the 2 cores a latency job takes by default
        yaml.safe_dump({"resources": {"latency": {"gpu": 1, "slurm_partition": "gpu", "threads": 1}}})
    )
    similarity = "results/{run}/smollm2-135m/similarity.csv"
    latency = "results/slurm/llama-135m/latency/cqil-S16-E28-P2-D0.json"
    cluster = snakemake(
        repo,
        "--cores",
        "all",
        *SLURM,
        *SMALL,
        str(tmp_path / "gpus.yaml"),
        "--config",
        "run=slurm",
        "--forcerun",
        "prepare_model",
        "--",
        similarity.format(run="slurm"),
        latency,
    )
    assert cluster.returncode == 0, cluster.stdout[-3000:] + cluster.stderr[-3000:]
    local = snakemake(
        repo, "--cores", "2", *SMALL, "--config", "run=slurmlocal", "--", similarity.format(run="slurmlocal")
    )
    assert local.returncode == 0, local.stderr[-3000:]
    pd.testing.assert_frame_equal(
        pd.read_csv(repo / similarity.format(run="slurm")),
        pd.read_csv(repo / similarity.format(run="slurmlocal")),
        rtol=1e-6,
    )
    jobs = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, check=True).stdout
    gpu_jobs = [line for line in jobs.splitlines() if "Partition=gpu" in line and "TresPerJob=gres:gpu:2" in line]
    assert gpu_jobs and all("JobState=COMPLETED" in line for line in gpu_jobs)  # the latency job: 2 ranks, 2 GPUs
    assert all(" CPUs/Task=1 " in line for line in gpu_jobs)  # config.resources.latency.threads
    assert pd.read_json(repo / latency, typ="series")["check"]["max_abs_diff"] < 1e-4


def test_a_failing_job_fails_the_run_promptly_and_names_its_log(slurm, repo, tmp_path):
    (tmp_path / "short.txt").write_text(
        "One line is far too little text for the corpus.\n"
    )  # the job fails, not the config
    (tmp_path / "broken.yaml").write_text(
        yaml.safe_dump({"corpus": {"source": "files", "files": [str(tmp_path / "short.txt")]}})
    )
    start = time.monotonic()
    result = snakemake(
        repo,
        "--cores",
        "all",
        *SLURM,
        *SMALL,
        str(tmp_path / "broken.yaml"),
        "--config",
        "run=slurmfail",
        "--",
        "results/slurmfail/smollm2-135m/corpus.json",
        timeout=300,
    )
    assert result.returncode != 0 and time.monotonic() - start < 180
    output = result.stdout + result.stderr
    assert "logs/slurmfail/corpus/smollm2-135m.log" in output and ".snakemake/slurm_logs/rule_corpus" in output


def test_a_gpu_jobs_step_sees_every_gpu_it_asked_for(slurm, tmp_path):
    """A job asking for 2 GPUs through the profile and plugin runs its command with both visible (a plugin that
    added --ntasks-per-gpu would start it once per GPU, each seeing one: ranks would share a GPU unnoticed)."""
    (tmp_path / "Snakefile").write_text(
        'rule gpus:\n    output: "visible.txt"\n    resources: gpu=2, slurm_partition="gpu", runtime=5, mem_mb=100\n'
        '    shell: "echo $CUDA_VISIBLE_DEVICES >> {output}"\n'
    )
    profiles = ["--profile", str(ROOT / "profiles/slurm"), "--profile", str(ROOT / "tests/profiles/slurm-ci")]
    result = snakemake(tmp_path, "--cores", "all", *profiles, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "visible.txt").read_text().split() == ["0,1"]  # one command, both GPUs
