"""`snakemake --cores all --profile slurm` against a real one-node SLURM that the fixture starts here.

tests/slurm/start.sh starts munged, slurmctld and slurmd on localhost with 2 fake GPUs (about a second;
it needs root and Debian's slurm-wlm and munge, which the README's test command installs); stop.sh stops
them by their pid files and puts back the /etc/slurm files that start.sh replaced (the fixture checks).
tests/profiles/slurm-ci is layered over profiles/slurm: squeue for job status (no accounting database
here) and short polling. The runs happen in a copy of the checkout; each is bounded by a timeout that kills.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, checkout_copy

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


def test_the_profile_resolves_from_the_repository_root(repo):
    """The users' literal command finds the profile (./slurm links to profiles/slurm) and plans SLURM jobs."""
    result = snakemake(repo, "-n", *SMALL, "--config", "run=slurmdry", "--profile", "slurm", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Using profiles slurm" in result.stdout + result.stderr and "slurm_partition=cpu" in result.stdout


def test_a_small_target_through_slurm_matches_a_local_run(slurm, repo, tmp_path):
    """Similarity of the default model, and a CQIL latency job asking for 2 GPUs on the gpu partition."""
    (tmp_path / "gpus.yaml").write_text(
        yaml.safe_dump({"resources": {"latency": {"gpu": 1, "slurm_partition": "gpu"}}})
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
