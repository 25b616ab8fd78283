"""The GPU script, run on CPU with `--dry-run` (tiny shapes): every command and record format it uses on a GPU."""

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
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    layers = json.loads((out / "layers.json").read_text())["records"]
    assert {(r["shape"], r["phase"]) for r in layers} == {("llama-135m", "prefill"), ("llama-135m", "decode")}
    decode = json.loads((out / "decode.json").read_text())
    assert [r["mode"] for r in decode["records"]] == ["eager", "static", "compiled"]
    assert decode["floor_ms"] is None and decode["weight_bytes"] > 0  # no GPU: no bandwidth floor
    original = json.loads((out / "original.json").read_text())
    assert sorted({p["tokens"] for p in original["parts"]}) == [16, 32]  # two lengths: the fit's slope
    check = json.loads((out / "cqil-2ranks.json").read_text())["check"]
    assert check["max_abs_diff"] < 1e-4 and check["argmax_agreement"] == 1.0
    assert "cqil on 2 ranks" in result.stdout
    presets = pd.read_csv(out / "simulation" / "gpu_presets.csv")
    assert "cpu/measured" in set(presets.hardware) and "H100-SXM/nccl" in set(presets.hardware)
    predicted = pd.read_csv(out / "simulation" / "predictions.csv")
    assert {"cqil S12-E30-P2-D0", "tp 2"} <= set(predicted[predicted.hardware == "cpu/measured"].setup)
    source = json.loads((out / "simulation" / "simulation.json").read_text())["hardware"]["cpu/measured"]["source"]
    assert "fitted to `cqil latency` on one cpu" in source and "all-reduce from H100-SXM/nccl" in source
