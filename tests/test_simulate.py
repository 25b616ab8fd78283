"""The analytic latency model: its limits, its calibration anchors, and fitting it to measured records."""

import json
from dataclasses import replace

import pytest

from cqil.cli import main
from cqil.plan import Plan
from cqil.simulate.fit import fit, graph_fit, validation
from cqil.simulate.model import GPT_FAST, HARDWARE, crossover, latency, layer_params, layer_time, reduction, shape_of
from cqil.simulate.predict import SimulateSettings

A100 = HARDWARE["A100-80GB/nccl"]
LLAMA_7B = shape_of("llama-7b")


def test_free_communication_and_no_rest_give_the_ideal_exactly():
    free = replace(A100, allreduce_latency=0, allreduce_per_doubling=0, bus_bandwidth=float("inf"), rest_fixed=0)
    headless = {**LLAMA_7B, "vocab_size": 0}
    for name in ("S12-E30-P2-D0", "S14-E30-P4-D0", "S0-E32-P8-D1"):
        plan = Plan.parse(name)
        for phase, tokens in (("decode", 1), ("prefill", 512)):
            assert reduction(headless, free, phase, tokens, plan) == pytest.approx(plan.ideal_reduction(32), abs=1e-12)


def test_one_rank_is_the_original():
    for phase, tokens in (("decode", 1), ("prefill", 2048)):
        original = latency(LLAMA_7B, A100, phase, tokens)
        assert latency(LLAMA_7B, A100, phase, tokens, Plan.parse("S12-E30-P1-D0")) == original
        assert latency(LLAMA_7B, A100, phase, tokens, tp=1) == original


def test_llama_7b_layer_size():
    assert layer_params(LLAMA_7B) == 202_375_168  # 4 d^2 + 3 d f: 404.8 MB in bf16 (performance.md 3.1)


@pytest.mark.parametrize("preset", sorted(GPT_FAST))
def test_tp_matches_gpt_fast_within_5_percent(preset):
    """The presets' calibration anchor: gpt-fast's Llama-2-7B TP 1/2/4/8 on A100 (ms per token)."""
    for ranks, measured in GPT_FAST[preset].items():
        predicted = 1e3 * latency(LLAMA_7B, HARDWARE[preset], "decode", tp=ranks)
        assert abs(predicted / measured - 1) < 0.05, (ranks, predicted, measured)


def test_crossover_is_where_cqil_and_tp_tie():
    plan = Plan.parse("S12-E30-P2-D0")
    a = crossover(LLAMA_7B, A100, plan)
    assert 10e-6 < a < 100e-6  # CQIL beats TP only once an all-reduce costs tens of microseconds
    at = replace(A100, allreduce_latency=a, allreduce_per_doubling=0)
    assert latency(LLAMA_7B, at, "decode", plan=plan) == pytest.approx(latency(LLAMA_7B, at, "decode", tp=2), rel=1e-9)
    slower = replace(at, allreduce_latency=2 * a)
    assert latency(LLAMA_7B, slower, "decode", plan=plan) < latency(LLAMA_7B, slower, "decode", tp=2)


MACHINE = replace(
    A100,
    name="made up",
    bandwidth=10e9,
    flops=1e9,
    layer_fixed=1e-4,
    rest_fixed=2e-3,
    allreduce_latency=3e-4,
    allreduce_per_doubling=0,
    bus_bandwidth=1e9,
)
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
}


def synthetic_runs(hw=MACHINE, shape=TINY, plan="S2-E6-P2-D0"):
    """`cqil latency` results of an original and a cqil run whose numbers come from the model itself (float32)."""

    def ms(phase, tokens=1, layers=shape["num_hidden_layers"], **setup):
        return 1e3 * latency({**shape, "num_hidden_layers": layers}, hw, phase, tokens, dtype_bytes=4, **setup)

    def records(**setup):
        return [
            {"threads": 1, "phase": phase, "tokens": t, "median_ms": ms(phase, t, **setup)}
            for t in (16, 64)
            for phase in ("prefill", "decode")
        ]

    parts = [
        {
            "threads": 1,
            "tokens": t,
            "prefill_layer_ms": ms("prefill", t, 1) - ms("prefill", t, 0),
            "decode_layer_ms": ms("decode", 1, 1) - ms("decode", 1, 0),
            "decode_rest_ms": ms("decode", 1, 0),
        }
        for t in (16, 64)
    ]
    allreduce = [{"bytes": b, "median_ms": 1e3 * (hw.allreduce_latency + b / hw.bus_bandwidth)} for b in (1e3, 1e6)]
    common = {"model": "synthetic", "dtype": "float32", "shape": shape, "degree": None}
    return [
        {**common, "engine": "original", "plan": None, "records": records(), "parts": parts, "allreduce": []},
        {
            **common,
            "engine": "cqil",
            "plan": plan,
            "records": records(plan=Plan.parse(plan)),
            "parts": [],
            "allreduce": allreduce,
        },
    ]


def test_fit_recovers_the_machine_and_validation_predicts_held_out_runs():
    runs = synthetic_runs()
    fitted = fit(runs[0], runs[1]["allreduce"])
    for field in ("bandwidth", "flops", "layer_fixed", "rest_fixed", "allreduce_latency", "bus_bandwidth"):
        assert getattr(fitted, field) == pytest.approx(getattr(MACHINE, field), rel=1e-6), field
    rows = validation(runs)
    assert {row["setup"] for row in rows} == {"original", "cqil S2-E6-P2-D0"}
    assert all(abs(row["error"]) < 1e-6 for row in rows)
    held_out = [row for row in rows if not row["fitted_on"]]
    assert len(held_out) == 4
    assert all(row["predicted_reduction"] == pytest.approx(row["measured_reduction"], abs=1e-9) for row in held_out)


def test_graph_fit_recovers_a_gpu_from_its_layer_records_and_compiled_decode():
    """A planted GPU: layer records and a compiled decode computed from a preset are fitted back to it."""
    gpu = replace(HARDWARE["H100-SXM/nccl"], rest_fixed=0.2e-3)
    layers = [
        {"shape": name, "dtype": "bfloat16", "graphs": graphs, "phase": phase, "tokens": tokens, "median_ms": ms}
        for name in ("llama-7b", "llama-13b", "llama-33b")
        for phase, tokens in (("prefill", 2048), ("decode", 2048))
        for graphs in (False, True)  # the eager records (slower: launches) are not what the fit reads
        for ms in [1e3 * layer_time(shape_of(name), gpu, phase, tokens) * (1 if graphs else 3)]
    ]
    compiled = 1e3 * latency(LLAMA_7B, gpu, "decode")
    fitted = graph_fit(layers, {"model": "random:llama-7b", "records": [{"mode": "compiled", "median_ms": compiled}]})
    for field in ("bandwidth", "flops", "layer_fixed", "rest_fixed"):
        assert fitted[field] == pytest.approx(getattr(gpu, field), rel=1e-6), field


def test_settings_refuse_unknown_shapes_presets_and_bad_plans():
    with pytest.raises(match="unknown shape 'llama-8b'"):
        SimulateSettings(plans={"llama-8b": []}, hardware=[])
    with pytest.raises(match="unknown preset 'TPU'"):
        SimulateSettings(plans={}, hardware=["TPU"])
    with pytest.raises(match="simulate.plans.llama-7b: plan S12-E34-P2-D0: E=34 exceeds"):
        SimulateSettings(plans={"llama-7b": ["S12-E34-P2-D0"]}, hardware=[])


def test_cli_writes_tables_and_figures(tmp_path):
    paths = []
    for i, run in enumerate(synthetic_runs()):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    settings = {
        "plans": {"llama-7b": ["S12-E30-P2-D0", "S14-E30-P4-D0"]},
        "hardware": ["A100-80GB/nccl"],
        "tp_degrees": [2, 4],
        "prefill_tokens": [512],
    }
    main(
        [
            "simulate",
            "--latency",
            *map(str, paths),
            "--settings",
            json.dumps(settings),
            "--out-dir",
            str(tmp_path / "sim"),
        ]
    )
    out = tmp_path / "sim"
    predictions = (out / "predictions.csv").read_text()
    assert "cqil S12-E30-P2-D0 x tp 2" in predictions and "cqil S14-E30-P4-D0 x tp 2" in predictions
    assert "cqil S14-E30-P4-D0 x tp 4" not in predictions  # 16 ranks: over max_ranks
    for name in ("simulation_reduction", "simulation_crossover", "simulation_validation"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    assert json.loads((out / "simulation.json").read_text())["fitted"]["synthetic"]["flops"] == pytest.approx(1e9)
