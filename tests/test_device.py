"""One device rule for every stage (`cqil.runtime.resolve_device`): with CUDA made to look present, every stage asks
for the job's GPU; every input reaches the model on the model's device; `load_model` puts every kind of spec on the
device it is given; and `cqil prepare` fetches a Hub model once, so that later jobs load it offline."""

import pytest
import torch

from cqil.errors import EngineError
from cqil.plan import Plan
from cqil.runtime import init, resolve_device

PLAN = Plan.parse("S2-E6-P2-D0")


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """No torchrun variables from the environment the tests run in."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def gpus(monkeypatch):
    """Make CUDA look present with `count` GPUs. Nothing may run on them: the spies below keep the work on the CPU."""

    def present(count: int = 1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a mocked GPU")  # provenance's machine()

    return present


# --- The rule ---------------------------------------------------------------------------------------------------


def test_without_cuda_auto_is_the_cpu_and_cuda_fails_with_one_line():
    assert torch.cuda.is_available() is False  # this test machine
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(EngineError) as err:
        resolve_device("cuda")
    assert str(err.value) == "device 'cuda': torch sees no CUDA device here (use auto or cpu)"


def test_a_bad_setting_names_the_allowed_values():
    with pytest.raises(EngineError) as err:
        resolve_device("gpu")
    assert str(err.value) == "device 'gpu': allowed are auto, cpu, cuda"


def test_with_cuda_auto_is_this_ranks_gpu(gpus, monkeypatch):
    gpus(2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda:1")


@pytest.fixture
def process_group(monkeypatch):
    """What `init` asks of torch.distributed and CUDA (recorded; no group is formed, no GPU is touched)."""
    calls = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.update(kw, group=backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(set_device=device))
    return calls


def test_more_ranks_than_gpus_fail_unless_the_shared_gpu_check_is_asked_for(gpus, process_group, monkeypatch):
    gpus(1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(EngineError) as err:
        init()
    assert "2 ranks on this machine but 1 visible GPU(s)" in str(err.value) and "\n" not in str(err.value)
    assert process_group == {}  # refused before any group or device is set up
    ranks = init(share_gpu=True)
    assert ranks.device == torch.device("cuda:0") and (ranks.rank, ranks.world) == (1, 2)
    assert process_group["group"] == "gloo" and process_group["device_id"] is None  # NCCL refuses a shared GPU
    assert process_group["set_device"] == torch.device("cuda:0")


def test_a_gpu_per_rank_takes_nccl_on_its_own_gpu(gpus, process_group, monkeypatch):
    gpus(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = init()
    assert ranks.device == process_group["device_id"] == process_group["set_device"] == torch.device("cuda:1")
    assert process_group["group"] == "nccl"
