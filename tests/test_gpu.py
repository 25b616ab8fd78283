"""The GPU script, run on CPU with `--dry-run` (tiny shapes): every step, command and record format it uses on a GPU."""

import json
import os
import subprocess

import pandas as pd
from conftest import ROOT


def test_the_gpu_script_runs_dry_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    result = subprocess.run(
        ["bash", "scripts/gpu_checks.sh", "--dry-run"],
        cwd=ROOT,
        env={**os.environ, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, (out / "log.txt").read_text()[-5000:] + result.stderr[-2000:]
    env = json.loads((out / "env.json").read_text())
    assert env["collectives"]["ok"] and env["collectives"]["float64"] and env["collectives"]["bfloat16"]
    assert env["tp1_check"]["max_abs_diff"] == 0.0  # DTensor of degree 1: the plain model's logits
    assert {"plain_eager", "tp1_eager"} <= set(env["dtensor_cost_eager"])
    assert {"plain_compiled", "tp1_compiled"} <= set(env["dtensor_cost_compiled"])
    engines = json.loads((out / "engines.json").read_text())
    assert set(engines) == {"cqil-S12-E28-P2-D0", "cqil-S12-E28-P2-D1", "tp-2"}
    assert all(check["margin"] < 1 and check["argmax_agreement"] == 1.0 for check in engines.values())
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["corpus", "similarity", "sensitivity", "search", "score", "finetune", "latency"]
    assert all(stage["ok"] and stage["device"] == "cpu" for stage in stages.values())
    finetune = json.loads((out / "finetune.json").read_text())
    assert [r["gradient_checkpointing"] for r in finetune.values() if r["ok"]] == [False, True]
    layers = json.loads((out / "layers.json").read_text())["records"]
    assert {(r["shape"], r["phase"]) for r in layers} == {("llama-135m", "prefill"), ("llama-135m", "decode")}
    decode = json.loads((out / "decode.json").read_text())
    assert [r["mode"] for r in decode["records"]] == ["eager", "static", "compiled"]
    assert decode["floor_ms"] is None and decode["weight_bytes"] > 0  # no GPU: no bandwidth floor
    original = json.loads((out / "original.json").read_text())
    assert sorted({p["tokens"] for p in original["parts"]}) == [16, 32]  # two lengths: the fit's slope
    presets = pd.read_csv(out / "simulation" / "gpu_presets.csv")
    assert "cpu/measured" in set(presets.hardware) and "H100-SXM/nccl" in set(presets.hardware)
    predicted = pd.read_csv(out / "simulation" / "predictions.csv")
    assert {"cqil S12-E30-P2-D0", "tp 2"} <= set(predicted[predicted.hardware == "cpu/measured"].setup)
    source = json.loads((out / "simulation" / "simulation.json").read_text())["hardware"]["cpu/measured"]["source"]
    assert (
        "fitted to `cqil latency` (random:llama-135m, float32) on one cpu" in source
        and "all-reduce from H100-SXM/nccl" in source
    )


def test_provenance_without_the_package_installed(monkeypatch):
    """The GPU image runs the checkout from PYTHONPATH: its records are written all the same."""
    from importlib.metadata import PackageNotFoundError

    from cqil import io

    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(io, "version", missing)
    assert io.provenance({})["versions"]["cqil"] == "not installed"
