"""lm-eval on local files: the shipped task YAMLs load offline, and an evaluation of the default model runs."""

import os

import pytest
from conftest import SHARED_DATA

from cqil.evaluate import lm_eval_tasks, render_tasks

pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data sits beside the checkout in CI")

ROWS = {
    "arc_easy_local": 2376,
    "arc_challenge_local": 1172,
    "winogrande_local": 1267,
    "mmlu_local": 14042,
    "piqa_local": 1838,
    "boolq_local": 3270,
    "openbookqa_local": 500,
}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the datasets cache of the JSON/CSV files


def test_task_yamls_render_with_absolute_paths(tmp_path):
    out = render_tasks(tmp_path / "tasks", data_dir=os.path.relpath(SHARED_DATA))
    assert sorted(p.name for p in out.glob("*.yaml")) == sorted(f"{name}.yaml" for name in ROWS)  # not the corpus tasks
    text = (out / "arc_easy_local.yaml").read_text()
    assert "${" not in text and f"{SHARED_DATA.resolve()}/arc/ARC-Easy-test.jsonl" in text


def test_task_yamls_load_offline(tmp_path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(render_tasks(tmp_path / "tasks", data_dir=SHARED_DATA)), include_defaults=False
    )
    tasks = manager.load(list(ROWS))["tasks"]
    for name, rows in ROWS.items():
        task = tasks[name]
        docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
        assert len(docs) == rows
        assert len(task.doc_to_choice(docs[0])) >= 2
        target, text = task.doc_to_target(docs[0]), task.doc_to_text(docs[0])
        assert (isinstance(text, str) and text.strip() and isinstance(target, int)) or name == "winogrande_local"
    assert tasks["mmlu_local"].config.num_fewshot == 5 and len(list(tasks["mmlu_local"].fewshot_docs())) == 285


@pytest.mark.slow
def test_evaluate_the_default_model(tmp_path):
    from cqil import load_model

    model, tokenizer = load_model("smollm2-135m")
    results = lm_eval_tasks(
        model,
        tokenizer,
        ["arc_easy_local", "winogrande_local", "mmlu_local"],
        render_tasks(tmp_path / "tasks", data_dir=SHARED_DATA),
        limit=10,
    )
    for task in ("arc_easy_local", "winogrande_local", "mmlu_local"):
        assert results[task]["sample_len"] == 10 and 0 <= results[task]["acc"] <= 1
        assert results[task]["acc_stderr"] >= 0


def test_corpus_tasks_run_on_a_tiny_model(tmp_path):
    """The offline default's own tasks: rolling perplexity and a 4-way cloze, on held-out blocks."""
    import json

    import torch
    from conftest import tiny_model, tiny_tokenizer

    from cqil.evaluate import build_corpus_tasks

    blocks = torch.randint(4, 96, (6, 12), generator=torch.Generator().manual_seed(0))
    tokenizer = tiny_tokenizer()
    folder = build_corpus_tasks(blocks, tokenizer, tmp_path / "data", seed=1)
    cloze = [json.loads(line) for line in (folder / "cloze.jsonl").read_text().splitlines()]
    assert len(cloze) == 6 and all(len(row["choices"]) == 4 for row in cloze)
    truth = [tokenizer.decode(b[6:]) for b in blocks]
    assert all(row["choices"][row["answer"]] == truth[i] for i, row in enumerate(cloze))
    include = render_tasks(tmp_path / "tasks", corpus_tasks=folder)
    assert sorted(p.name for p in include.glob("*.yaml")) == ["cqil_cloze.yaml", "cqil_heldout.yaml"]
    model = tiny_model(dtype=torch.float32)
    results = lm_eval_tasks(model, tokenizer, ["cqil_heldout", "cqil_cloze"], include, batch_size=4)
    assert results["cqil_cloze"]["sample_len"] == 6 and 0 <= results["cqil_cloze"]["acc"] <= 1
    assert results["cqil_heldout"]["word_perplexity"] > 1
