"""The distributed engines against the single-process result, and a failing rank never hangs a run.

Each engine test runs `cqil latency` on 2 gloo processes (started by torchrun) on a tiny random model.
The check inside that run teacher-forces the engine with the reference's greedy tokens over a padded
batch of 2 and 8 cached decode steps, and compares every logit.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from cqil.cli import main
from cqil.latency.check import check_failure
from cqil.latency.engine import measure
from cqil.latency.settings import Job, LatencySettings
from cqil.latency.table import table
from cqil.latency.timing import SLOWDOWN
from cqil.plan import Plan, Setup
from cqil.runtime import EngineError, Ranks, bind, launch, pin
from cqil.runtime.cqil import shard
from cqil.runtime.tp import check_degree
from tests.conftest import tiny_config, tiny_model, tiny_tokenizer

SETTINGS = {
    "prompt_lengths": [12],
    "new_tokens": 3,
    "warmup": 0,
    "repeats": 2,
    "check_batch_size": 2,
    "check_length": 16,
    "check_new_tokens": 8,
    "allreduce_tokens": [1, 12],
    "allreduce_repeats": 3,
    "timeout": 60,
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Saved tiny float32 llama and qwen2 (q/k/v with biases) models, 8 layers, 4 heads, 2 KV heads."""
    dirs = {}
    for family in ("llama", "qwen2"):
        path = tmp_path_factory.mktemp(family) / "model"
        tiny_model(family, dtype=torch.float32).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        dirs[family] = path
    return dirs


def run_latency(tmp_path, model, *args, settings=SETTINGS) -> dict:
    out = tmp_path / "latency.json"
    main(["latency", "--model", str(model), *args, "--settings", json.dumps(settings), "--out", str(out)])
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "family, args, placement",
    [
        ("llama", ["--engine", "cqil", "--plan", "S2-E6-P2-D0"], "replicated"),
        ("llama", ["--engine", "cqil", "--plan", "S0-E8-P2-D1"], "replicated"),  # from layer 0: slots read for lengths
        ("qwen2", ["--engine", "cqil", "--plan", "S2-E8-P2-D1-official"], "replicated"),
        ("llama", ["--engine", "cqil", "--plan", "S2-E6-P2-D1"], "rank0"),  # the official code's placement
        ("llama", ["--engine", "cqil", "--plan", "S0-E8-P2-LP"], "replicated"),  # LP: the attention outputs all-reduced
        ("qwen2", ["--engine", "cqil", "--plan", "S2-E6-P2-LP"], "rank0"),
        ("llama", ["--engine", "tp", "--degree", "2"], None),
        ("qwen2", ["--engine", "tp", "--degree", "2"], None),
    ],
)
def test_two_ranks_match_one_process(tiny_dirs, tmp_path, family, args, placement):
    result = run_latency(
        tmp_path, tiny_dirs[family], *args, settings=SETTINGS | {"placement": placement or "replicated"}
    )
    check = result["check"]
    assert check["batch_size"] == 2 and check["decode_steps"] == 8
    assert check["positions"] == 2 * 16 - 16 // 4 + 2 * 8  # real prompt tokens + decode steps of both rows
    assert check["max_abs_diff"] < 1e-4 and check["argmax_agreement"] == 1.0
    if result["engine"] == "cqil":  # the plan itself changes the logits, far beyond the tolerance
        assert check["plan_effect_max_abs_diff"] > 1e-2
    assert result["ranks"] == 2 and len(result["allreduce"]) == 2
    assert {(r["phase"], r["tokens"]) for r in result["records"]} == {("prefill", 12), ("decode", 12)}
    assert all(len(r["samples_ms"]) == 2 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] for r in result["records"])
    assert all(len(r["baseline_samples_ms"]) == 2 for r in result["records"])  # the original, timed in the same run
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
        assert result["rank0_cores"] == sorted(os.sched_getaffinity(0))[:1]  # each rank bound to its own core


@pytest.mark.parametrize(
    "args",
    [
        ["--engine", "cqil", "--plan", "S2-E6-P2-D1"],  # all-gather and all-reduce inside the compiled step
        ["--engine", "tp", "--degree", "2"],  # DTensor's collectives
        ["--engine", "pruned", "--plan", "drop-2-5"],
    ],
)
def test_compiled_engines_match_their_eager_reference(tiny_dirs, tmp_path, args):
    """Static cache and torch.compile (dynamo's capture, the eager backend on CPU): checked against the eager
    single-process reference in the same run, and no recompilation in a timed repeat (it would raise)."""
    compiled = SETTINGS | {"mode": "compiled", "backend": "eager", "repeats": 3, "prompt_lengths": [12, 16]}
    result = run_latency(tmp_path, tiny_dirs["llama"], *args, settings=compiled)
    assert result["mode"] == "compiled"
    assert result["check"]["max_abs_diff"] < 1e-4 and result["check"]["argmax_agreement"] == 1.0
    assert all(len(r["samples_ms"]) == 3 for r in result["records"])
    frame = table([result, run_latency(tmp_path / "original", tiny_dirs["llama"], "--engine", "original")])
    assert set(frame["mode"]) == {"compiled", "eager"}  # the table says which mode each row ran in


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity API here")
def test_pin_gives_each_rank_its_own_cores():
    allowed, pool = os.sched_getaffinity(0), torch.get_num_threads()
    cores = sorted(allowed)
    try:
        for rank in range(2):
            torch.set_num_threads(len(cores))  # as OMP_NUM_THREADS from a job of several threads leaves it
            expected = cores[rank : rank + 1] if len(cores) >= 2 else None
            assert pin(Ranks(rank, 2, torch.device("cpu")), threads=1) == expected
            assert os.sched_getaffinity(0) == set(expected or allowed)
            assert torch.get_num_threads() == (1 if expected else len(cores))  # a pool the size of its cores
            bind(allowed)  # each rank is its own process, starting from the job's cores
        assert pin(Ranks(0, 2, torch.device("cpu")), threads=len(cores)) is None  # too few cores: left alone
        assert pin(Ranks(0, 1, torch.device("cpu")), threads=1) is None  # one rank: nothing to split
    finally:
        bind(allowed)
        torch.set_num_threads(pool)


def test_pruned_model_runs_on_one_rank_beside_the_original(tiny_dirs, tmp_path):
    result = run_latency(tmp_path, tiny_dirs["llama"], "--engine", "pruned", "--plan", "drop-2-5-6")
    assert (result["engine"], result["plan"], result["ranks"], result["check"]) == ("pruned", "drop-2-5-6", 1, None)
    assert all(len(r["baseline_samples_ms"]) == 2 for r in result["records"])  # the original, timed in the same run
    frame = table([{"path": "x", **result}])
    assert set(frame.setup) == {"pruned drop-2-5-6"} and (frame.ideal == 3 / 8).all()


def test_a_busy_machine_marks_the_result_contended_and_the_table_leaves_it_out(tiny_dirs, tmp_path, capsys):
    """Other work on the job's cores (one busy loop per core) is seen in /proc/stat and flags the result."""
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat: the load is unknown here")
    timed = SETTINGS | {"prompt_lengths": [64], "new_tokens": 8, "repeats": 12}
    (tmp_path / "quiet").mkdir()
    quiet = run_latency(tmp_path / "quiet", tiny_dirs["llama"], "--engine", "original", settings=timed)
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    try:
        time.sleep(0.5)  # the loops are running
        busy = run_latency(tmp_path, tiny_dirs["llama"], "--engine", "pruned", "--plan", "drop-2", settings=timed)
    finally:
        for loop in loops:
            loop.kill()
    assert busy["load"]["contended"] and busy["load"]["share"] > 0.3
    assert busy["load"]["share"] > quiet["load"]["share"] and busy["load"]["limit"] == 0.1
    assert "cqil: warning: contended: other processes took" in capsys.readouterr().out
    main(
        ["latency-table", str(tmp_path / "quiet" / "latency.json"), str(tmp_path / "latency.json")]
        + ["--out", str(tmp_path / "latency.csv")]
    )
    assert "measured on a busy machine" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "latency.csv")
    pruned = frame[frame.engine == "pruned"]
    assert pruned.contended.all() and pruned.reduction.isna().all() and (pruned.median_ms > 0).all()
    original = frame[frame.engine == "original"]  # contended or not, as the quiet run found the machine
    assert (original.contended == quiet["load"]["contended"]).all()


def test_the_slowdown_hook_slows_the_engine_and_not_its_baseline(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv(SLOWDOWN, "1.0")  # every forward of the engine takes twice as long
    result = run_latency(tmp_path, tiny_dirs["llama"], "--engine", "pruned", "--plan", "drop-2")
    assert result["slowdown"] == 1.0
    for record in result["records"]:  # 7 of 8 layers, twice as long, against the same run's original
        assert record["median_ms"] > 1.3 * record["baseline_median_ms"]


def test_original_records_threads_and_parts(tiny_dirs, tmp_path):
    result = run_latency(
        tmp_path, tiny_dirs["llama"], "--engine", "original", settings=SETTINGS | {"baseline_threads": [1, 2]}
    )
    assert result["check"] is None and result["ranks"] == 1 and result["allreduce"] == []
    assert sorted({r["threads"] for r in result["records"]}) == [1, 2]
    part = result["parts"][0]
    assert part["layers"] == 8 and part["prefill_layer_ms"] > 0 and part["decode_layer_ms"] > 0
    assert part["decode_rest_ms"] > 0  # embedding, norm, head and sampling are not free


def test_table_reductions():
    def result(engine, median, **extra):
        record = {
            "phase": "prefill",
            "tokens": 8,
            "batch_size": 1,
            "threads": 1,
            "median_ms": median,
            "p10_ms": median,
            "p90_ms": median,
        }
        return {
            "model": "m",
            "engine": engine,
            "ranks": 2,
            "layers": 8,
            "check": None,
            "records": [record],
            "plan": None,
            "degree": None,
            **extra,
        }

    interleaved = result("tp", 60.0, degree=2)
    interleaved["records"][0]["baseline_median_ms"] = 120.0  # timed in the tp run itself: preferred
    frame = table([result("original", 100.0), result("cqil", 80.0, plan="S0-E8-P2-D0"), interleaved])
    assert frame.setup.tolist() == ["original, 1 thread", "cqil S0-E8-P2-D0", "tp 2"]
    assert frame.baseline.tolist() == ["separate run", "separate run", "same run"]
    assert frame.reduction.round(6).tolist() == [0.0, 0.2, 0.5]
    assert frame.ideal.tolist() == [0.0, 0.5, 0.5]  # S0-E8-P2 on 8 layers: half the layers saved
    assert frame.of_ideal.round(6).tolist()[1:] == [0.4, 1.0]


def test_bad_degree_and_world_refused_up_front(tiny_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_latency(tmp_path, tiny_dirs["llama"], "--engine", "tp", "--degree", "3")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "cqil: error: tp degree 3: the model has 4 attention heads, 2 KV heads "
        "and MLP width 128; the degree must divide all three (allowed: 1, 2)"
    )
    with pytest.raises(SystemExit):
        run_latency(tmp_path, tiny_dirs["llama"], "--engine", "cqil")
    assert "engine cqil needs a plan" in capsys.readouterr().err
    with pytest.raises(EngineError, match="9 attention heads, 3 KV heads"):  # SmolLM2-135M's shape over 2 ranks
        check_degree(tiny_config(hidden_size=576, num_attention_heads=9, num_key_value_heads=3), 2)
    with pytest.raises(SystemExit):  # the settings: a bad mode or placement before any model loads
        run_latency(tmp_path, tiny_dirs["llama"], "--engine", "original", settings={"placement": "ring"})
    assert "latency.placement: 'ring' is not one of replicated, rank0" in capsys.readouterr().err
    with pytest.raises(EngineError, match="latency.mode: 'graph' is not one of eager, static, compiled"):
        LatencySettings(mode="graph")


def test_a_run_under_a_torchrun_of_another_size_is_refused(tiny_dirs, monkeypatch):
    """What only the live run can tell: the process group has as many ranks as the setup needs."""
    import cqil.latency.engine

    job = Job.check(str(tiny_dirs["llama"]), "cqil", Plan.parse("S2-E6-P2-D0"), None)
    monkeypatch.setattr(cqil.latency.engine.runtime, "init", lambda *args, **kwargs: Ranks(0, 3, torch.device("cpu")))
    with pytest.raises(EngineError, match="engine cqil: needs 2 ranks, this run has 3"):
        measure(job, LatencySettings())


FAILING = """
import sys, time, torch, torch.distributed as dist
from cqil.runtime import init
ranks = init(timeout=float(sys.argv[2]))
if ranks.rank == 1:
    if sys.argv[1] == "raise":
        raise RuntimeError("rank 1 fails")
    if sys.argv[1] == "hang":
        time.sleep(600)
dist.all_reduce(torch.ones(4))
ranks.close()
"""


@pytest.mark.parametrize("failure", ["raise", "hang"])
def test_failing_rank_ends_the_run(tmp_path, failure):
    """A rank that raises, or one stuck outside the collective, makes the launch fail within the timeout."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    start = time.monotonic()
    with pytest.raises(EngineError, match="torchrun exited with status"):
        launch([str(script), failure, "10"], nproc=2)
    assert time.monotonic() - start < 60  # the 10 s collective timeout, then torchrun stops the other rank


def test_busy_default_port(tmp_path):
    """torchrun --standalone picks a free port, so a busy 29500 (torchrun's default) does not matter."""
    script = tmp_path / "ok.py"
    script.write_text(FAILING)
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:
            pass  # already taken by something else: just as busy
        launch([str(script), "none", "10"], nproc=2)


def test_cli_launches_torchrun_and_rank0_writes(tiny_dirs, tmp_path):
    """`cqil latency` outside torchrun starts it; only rank 0 writes the JSON (the file is whole)."""
    out = tmp_path / "cqil.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cqil",
            "latency",
            "--model",
            str(tiny_dirs["llama"]),
            "--engine",
            "cqil",
            "--plan",
            "S2-E6-P2-D0",
            "--settings",
            json.dumps(SETTINGS),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["plan"] == "S2-E6-P2-D0" and result["provenance"]["machine"]["cores"] >= 1
    assert LatencySettings(**result["settings"]).check_new_tokens == 8


BROKEN_ENGINE = """
# Imported by `site` at the start of every process (the test puts it on PYTHONPATH): each rank's group
# output is off by one, as a bug in the engine would make it. The library itself is unchanged.
import cqil.runtime.cqil as engine

correct = engine.rank_share
engine.rank_share = lambda *args, **kwargs: correct(*args, **kwargs) + 1.0
"""


def test_a_failing_check_fails_the_run_before_any_timing(tiny_dirs, tmp_path):
    """An engine whose logits leave the tolerance ends the job non-zero with one line, and writes nothing."""
    (tmp_path / "sitecustomize.py").write_text(BROKEN_ENGINE)
    out = tmp_path / "cqil.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cqil",
            "latency",
            "--model",
            str(tiny_dirs["llama"]),
            "--engine",
            "cqil",
            "--plan",
            "S2-E6-P2-D0",
            "--settings",
            json.dumps(SETTINGS),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode != 0 and not out.exists()
    errors = [line for line in run.stderr.splitlines() if line.startswith("cqil: error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], run.stderr  # rank 0's line, repeated by the launcher last
    assert errors[-1].startswith("cqil: error: engine cqil, plan S2-E6-P2-D0: check failed, max |logit difference| ")
    assert errors[-1].endswith(" exceeds 0.0001 (float32); no timing was written")
    assert "[rank1]" not in run.stderr  # rank 1 stops cleanly, without the traceback of a broken connection


def test_check_tolerance_by_dtype():
    failure = check_failure(
        {"max_abs_diff": 1.2, "reference_max_abs": 10.0}, Setup.parse("cqil-S2-E6-P2-D1"), torch.bfloat16
    )
    assert failure == (
        "engine cqil, plan S2-E6-P2-D1: check failed, max |logit difference| 1.2 against the "
        "single-process reference exceeds 1 (bfloat16); no timing was written"
    )
    # TP 2 at LLaMA-7B width on an H200 drifted 0.352 against logits up to 6.82 (results/gpu/log.txt)
    assert check_failure({"max_abs_diff": 0.352, "reference_max_abs": 6.82}, Setup("tp", degree=2), "bfloat16") is None
    assert check_failure({"max_abs_diff": 9e-5, "reference_max_abs": 1e3}, Setup("tp", degree=2), torch.float32) is None
    assert "degree 2: check failed, max |logit difference| nan" in check_failure(
        {"max_abs_diff": float("nan"), "reference_max_abs": 1.0}, Setup("tp", degree=2), torch.float32
    )


def test_layer_latency_on_cpu(tmp_path, capsys):
    """The GPU script's command, on CPU and one small shape: prefill and decode records of one layer."""
    out = tmp_path / "layers.json"
    main(
        [
            "layer-latency",
            "--shapes",
            "llama-135m",
            "--lengths",
            "8",
            "--context",
            "16",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--modes",
            "eager",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--out",
            str(out),
        ]
    )
    records = json.loads(out.read_text())["records"]
    assert [(r["phase"], r["tokens"]) for r in records] == [("prefill", 8), ("decode", 16)]
    assert records[0]["layer_bytes"] == 4 * (2 * 576 * 576 + 2 * 576 * 288 + 3 * 576 * 1536 + 2 * 576)
    assert "| llama-135m" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["layer-latency", "--shapes", "llama-135m", "--device", "cpu", "--modes", "graphs", "--out", str(out)])
    assert "--graphs needs a CUDA device" in capsys.readouterr().err


# --- Sharding, without processes: what each rank keeps ----------------------------------------------


def test_cqil_shard_keeps_one_layer_per_group_and_fills_the_cache_slots_read_for_lengths():
    from cqil.runtime.cqil import NoHead, placeholder, rank_last_member
    from cqil.transform import record_and_pass

    plan = Plan.parse("S0-E6-P2-D0")  # groups [0, 1], [2, 3] and [4, 5] of 8 layers
    for rank in (0, 1):
        model = shard(tiny_model(dtype=torch.float32), plan, rank=rank)
        layers = model.model.layers
        on_meta = [i for i, layer in enumerate(layers) if layer.mlp.up_proj.weight.is_meta]
        assert on_meta == [1 - rank, 3 - rank, 5 - rank]  # the other rank's layer of each group
        for first in (0, 2, 4):
            assert layers[first].forward.func is record_and_pass
            last = layers[first + 1].forward
            assert last.func is rank_last_member and last.args[0][rank] is layers[first + rank]
            assert all(layer.self_attn.layer_idx == i for i, layer in enumerate(layers))  # each its own slot
        # layer 0's slot is where transformers reads the cache length: rank 1, which does not compute it, fills it
        assert layers[1].forward.args[5] == ([(0, (2, 16))] if rank == 1 else [])
        assert all("forward" not in layers[i].__dict__ for i in (6, 7))  # replicated: the layer's own forward
        assert not isinstance(model.lm_head, NoHead)
    plan = Plan.parse("S2-E6-P2-D0")
    model = shard(tiny_model(dtype=torch.float32), plan, rank=1, placement="rank0")
    layers = model.model.layers
    assert [i for i, layer in enumerate(layers) if layer.mlp.up_proj.weight.is_meta] == [0, 1, 2, 4, 6, 7]
    assert all(layers[i].forward.func is placeholder and layers[i].forward.args[0] == i for i in (0, 1, 6, 7))
    assert isinstance(model.lm_head, NoHead)  # rank 1 never computes logits under rank-0 placement


def test_tp_plan_splits_every_projection_of_every_layer():
    """On a one-rank process group, `parallelize_module` turns exactly the seven projections of each layer
    into DTensors: q, k, v, gate and up split by output rows (Shard(0)), o and down by input columns (Shard(1))."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    from cqil.runtime import tp

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for family in ("llama", "qwen2"):
            model = tp.shard(tiny_model(family, dtype=torch.float32), degree=1, device_type="cpu")
            sharded = {
                name: param.placements[0] for name, param in model.named_parameters() if isinstance(param, DTensor)
            }
            columns = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
            expected = {
                f"model.layers.{i}.{part}.{name}.weight": Shard(0 if name in columns else 1)
                for i in range(8)
                for part, names in (
                    ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                    ("mlp", ("gate_proj", "up_proj", "down_proj")),
                )
                for name in names
            }
            if family == "qwen2":  # q, k, v have biases, split with their rows
                expected |= {
                    f"model.layers.{i}.self_attn.{name}.bias": Shard(0)
                    for i in range(8)
                    for name in ("q_proj", "k_proj", "v_proj")
                }
            assert sharded == expected
    finally:
        dist.destroy_process_group()
