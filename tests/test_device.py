"""One device rule for every stage (`cqil.runtime.resolve_device`): with CUDA made to look present, every stage asks
for the job's GPU; every input reaches the model on the model's device; `load_model` puts every kind of spec on the
device it is given; and `cqil prepare` fetches a Hub model once, so that later jobs load it offline."""

import inspect
import json
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from huggingface_hub.utils import filter_repo_objects

from cqil import analysis, baselines, evaluate, load_model, search
from cqil.analysis import SensitivitySettings, SimilaritySettings, sensitivity, similarity
from cqil.baselines import BaselinesSettings, block_influence, greedy_removal
from cqil.cli import build_parser
from cqil.errors import EngineError, ModelError
from cqil.evaluate import EvaluateSettings
from cqil.metrics import block_nll
from cqil.models import HUB_FILES, run_prepare
from cqil.plan import Plan
from cqil.runtime import init, resolve_device
from cqil.search import ScoreSettings, SearchSettings, score_plans
from cqil.stages import STAGES as STAGE_TABLE

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


# --- Every stage asks for the GPU ---------------------------------------------------------------------------------


@pytest.fixture
def asked(monkeypatch):
    """The devices the stages ask `load_model` for; the model itself is loaded on the CPU."""
    devices = []

    def spy(*args, device=None, **kwargs):
        devices.append(device)
        return load_model(*args, device="cpu", **kwargs)

    for module in (analysis, search, baselines, evaluate):
        monkeypatch.setattr(module, "load_model", spy)
    return devices


def blocks(n=4, length=12, seed=0):
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def run_similarity(model, corpus, tmp):
    analysis.run_similarity(SimilaritySettings(batch_size=2), model=model, corpus=corpus, out=tmp / "similarity.csv")
    return tmp / "similarity.json"


def run_sensitivity(model, corpus, tmp):
    settings = SensitivitySettings(distances=[1], batch_size=2)
    analysis.run_sensitivity(settings, model=model, corpus=corpus, out=tmp / "sensitivity.csv")
    return tmp / "sensitivity.json"


def run_search(model, corpus, tmp):
    settings = SearchSettings(starts=[2], ends=[6], sizes=[2], bypasses=[0], include=[], batch_size=2)
    search.run_search(settings, model=model, corpus=corpus, out=tmp / "search.csv")
    return tmp / "search.json"


def run_score(model, corpus, tmp):
    search.run_score(ScoreSettings(batch_size=2), model=model, plan=PLAN, corpus=corpus, out=tmp / "score.json")
    return tmp / "score.json"


def run_baselines(model, corpus, tmp):
    (tmp / "selected.json").write_text(json.dumps({"plans": [str(PLAN)]}))
    settings = BaselinesSettings(rules=["block_influence"], batch_size=2)
    baselines.run_baselines(
        settings, model=model, corpus=corpus, selected=tmp / "selected.json", out=tmp / "baselines.json"
    )
    return tmp / "baselines.json"


def run_evaluate(model, corpus, tmp):
    wikitext = tmp / "wiki.test.raw"
    wikitext.write_bytes("\r\n".join(" ".join(f"w{(i * 7 + j) % 90}" for j in range(20)) for i in range(6)).encode())
    settings = EvaluateSettings(
        data_dir=None, tasks=["cqil_heldout"], questions={}, wikitext=str(wikitext), wikitext_tokens=100, batch_size=4
    )
    evaluate.run_evaluate(settings, model=model, corpus=corpus, plan=PLAN, out=tmp / "eval.json")
    return tmp / "eval.json"


STAGES = [run_similarity, run_sensitivity, run_search, run_score, run_baselines, run_evaluate]


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.__name__.removeprefix("run_"))
def test_every_stage_asks_for_the_gpu(stage, gpus, asked, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # lm-eval's datasets cache
    corpus = tmp_path / "corpus.pt"
    torch.save({split: blocks(seed=i) for i, split in enumerate(("calibration", "search", "finetune", "test"))}, corpus)
    gpus(1)
    written = stage(str(tiny_dir), corpus, tmp_path)
    assert asked == [torch.device("cuda:0")]
    assert json.loads(written.read_text())["provenance"]["settings"]["device"] == "cuda:0"


def test_the_command_line_offers_the_device_of_every_stage():
    for name in ("similarity", "sensitivity", "search", "score", "baselines", "evaluate"):
        assert inspect.signature(STAGE_TABLE[name][1]).parameters["device"].default == "auto", name
    args = build_parser().parse_args(["similarity", "--model", "m", "--corpus", "c", "--out", "o", "--device", "cuda"])
    assert args.device == "cuda"


# --- Every input goes to the model's device -----------------------------------------------------------------------


class HostIds(torch.Tensor):
    """Token ids as the corpus hands them over, on the host: they may be split, sliced, counted and moved (`.to`
    gives a plain tensor); any computation with them raises, as a GPU model fed host tensors would."""

    KEPT = {torch.Tensor.split, torch.Tensor.__getitem__, torch.Tensor.__len__, torch.Tensor.size}
    KEPT |= {torch.Tensor.shape.__get__, torch.Tensor.device.__get__, torch.Tensor.dtype.__get__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            return super().__torch_function__(func, types, args, kwargs).as_subclass(torch.Tensor)
        if func in cls.KEPT:
            return super().__torch_function__(func, types, args, kwargs)
        raise AssertionError(f"{getattr(func, '__name__', func)} on host ids: they were not moved to the model")


def test_host_ids_catch_an_input_left_on_the_host():
    model = tiny_model(dtype=torch.float32)
    with pytest.raises(AssertionError, match="not moved to the model"):
        model(input_ids=blocks().as_subclass(HostIds))
    assert model(input_ids=blocks().as_subclass(HostIds).to("cpu")).logits.shape == (4, 12, 96)


@pytest.mark.parametrize(
    "compute",
    [
        lambda model, ids: similarity(model, ids, batch_size=3),
        lambda model, ids: sensitivity(model, ids, (2,), batch_size=3),
        lambda model, ids: score_plans(model, ids, [PLAN], batch_size=3, progress=False),
        lambda model, ids: score_plans(model, ids, [PLAN], batch_size=3, reuse_prefix=False, progress=False),
        lambda model, ids: block_influence(model, ids, batch_size=3),
        lambda model, ids: greedy_removal(model, ids, 2, [3, 4, 5], batch_size=3),
        lambda model, ids: block_nll(model, ids[0], 5),
    ],
    ids=["similarity", "sensitivity", "search", "search-from-embeddings", "block-influence", "greedy", "perplexity"],
)
def test_every_batch_is_moved_to_the_model(compute):
    model, ids = tiny_model(), blocks(n=5)
    expected = compute(model, ids)
    found = compute(model, ids.as_subclass(HostIds))
    # the same numbers: only where the inputs live was watched
    assert np.array_equal(found, expected) if isinstance(expected, np.ndarray) else found == expected


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
