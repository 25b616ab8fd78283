"""One device rule for every stage (`cqil.runtime.resolve_device`): with CUDA made to look present, every stage asks
for the job's GPU; every input reaches the model on the model's device; `load_model` puts every kind of spec on the
device it is given; and `cqil prepare` fetches a Hub model once, so that later jobs load it offline."""

import json
import shutil

import huggingface_hub
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from huggingface_hub.utils import filter_repo_objects

from cqil import load_model
from cqil.errors import EngineError, ModelError
from cqil.models import HUB_FILES, run_prepare
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


# --- load_model honours the device for every kind of spec ----------------------------------------------------------


def on(model, device: str) -> bool:
    return {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {device}


def test_a_directory_loads_on_the_device_without_hooks_and_takes_a_plan(tiny_dir):
    model, _ = load_model(str(tiny_dir), plan=PLAN, device="meta")  # meta: where no weight is read
    assert on(model, "meta") and model.config.cqil_plan == str(PLAN)
    assert not any(hasattr(module, "_hf_hook") for module in model.modules())  # no accelerate dispatch
    model, _ = load_model(str(tiny_dir), device=torch.device("cpu"))
    reference = tiny_model(dtype=torch.float32)
    assert on(model, "cpu") and all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_a_random_shape_is_built_on_the_device():
    model, _ = load_model("random:llama-7b", device="meta")
    assert on(model, "meta") and sum(p.numel() for p in model.parameters()) > 6e9


@pytest.mark.slow
def test_the_embedded_model_and_its_gguf_file_load_on_the_device():
    from cqil.models import EMBEDDED, prepare_embedded

    gguf = prepare_embedded("smollm2-135m") / EMBEDDED["smollm2-135m"].gguf.split("/")[-1]
    for spec in ("smollm2-135m", str(gguf)):
        model, _ = load_model(spec, device="meta")
        assert on(model, "meta") and model.config.num_hidden_layers == 30, spec


# --- prepare fetches a Hub model once; later jobs load it offline ---------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_dir):
    """A Hugging Face cache holding 'tiny-org/tiny' as `cqil prepare` would leave it: only the files that match
    HUB_FILES, in the cache's layout (refs/main -> snapshots/<commit>/)."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny"
    commit = "0" * 40
    files = list(filter_repo_objects([p.name for p in tiny_dir.iterdir()], allow_patterns=HUB_FILES))
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in files:
        shutil.copy(tiny_dir / name, repo / "snapshots" / commit / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / commit


@pytest.fixture
def downloads(monkeypatch):
    """The Hub ids `snapshot_download` is asked for, and with which files (the real function then runs)."""
    calls = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("allow_patterns")))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return calls


def test_prepare_fetches_a_hub_model_and_later_loads_are_offline(hub_cache, downloads, tmp_path):
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: the Hub is never asked
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in hub_cache.iterdir()}
    run_prepare(model="tiny-org/tiny", out=tmp_path / "model.json", layers=8)
    assert downloads == [("tiny-org/tiny", HUB_FILES)]
    assert json.loads((tmp_path / "model.json").read_text())["layers"] == 8
    model, tokenizer = load_model("tiny-org/tiny", device="cpu")
    ids = tokenizer("w1 w2 w3", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_model(dtype=torch.float32)(input_ids=ids).logits)
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()


def test_prepare_fetches_nothing_for_local_and_random_models(downloads, tiny_dir, tmp_path):
    run_prepare(model=str(tiny_dir), out=tmp_path / "dir.json")
    run_prepare(model="random:llama-135m", out=tmp_path / "random.json")
    assert downloads == []


def test_a_hub_model_that_cannot_be_fetched_fails_with_one_line(hub_cache, downloads, tmp_path):
    with pytest.raises(ModelError) as err:
        run_prepare(model="tiny-org/absent", out=tmp_path / "model.json")
    assert str(err.value).startswith("model 'tiny-org/absent': cannot download it from the Hugging Face Hub: ")
    assert "\n" not in str(err.value) and not (tmp_path / "model.json").exists()
    (hub_cache / "model.safetensors").unlink()  # a cache without the weights is not ready for the GPU jobs
    with pytest.raises(ModelError, match="tiny-org/tiny'.* has no weights"):
        run_prepare(model="tiny-org/tiny", out=tmp_path / "model.json")
