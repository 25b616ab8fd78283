"""Evaluation on real data: the task YAMLs load offline from data/, every question's score is kept, subsets are
seeded, WikiText-2 perplexity, and bad settings fail before any model loads."""

import json
import os

import pytest
import torch
from conftest import ROOT, SHARED_DATA, tiny_model, tiny_tokenizer

from cqil.errors import CqilError
from cqil.evaluate import (
    EvaluateSettings,
    build_corpus_tasks,
    lm_eval_tasks,
    local_tasks,
    present,
    render_tasks,
    subset,
    task_files,
    wikitext_perplexity,
    wikitext_text,
)

DATA = ROOT / "data"
ROWS = {
    "arc_easy_local": 2376,
    "arc_challenge_local": 1172,
    "winogrande_local": 1267,
    "piqa_local": 1838,
    "openbookqa_local": 500,
}  # what data/ ships; MMLU and BoolQ are read from ../shared/data
SHARED_ROWS = {"mmlu_local": 14042, "boolq_local": 3270}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the datasets cache of the JSON/CSV files


def test_task_yamls_render_with_absolute_paths(tmp_path):
    out = render_tasks(tmp_path / "tasks", data_dir=os.path.relpath(DATA))
    assert sorted(p.name for p in out.glob("*.yaml")) == sorted(f"{n}.yaml" for n in ROWS | SHARED_ROWS)  # not cqil_*
    text = (out / "arc_easy_local.yaml").read_text()
    assert "${" not in text and f"{DATA.resolve()}/arc/ARC-Easy-test.jsonl" in text


def load_tasks(tmp_path, data_dir, names):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(render_tasks(tmp_path / "tasks", data_dir=data_dir)), include_defaults=False)
    return manager.load(list(names))["tasks"]


def test_the_shipped_tasks_load_offline(tmp_path):
    tasks = load_tasks(tmp_path, DATA, ROWS)
    for name, rows in ROWS.items():
        docs = list(tasks[name].eval_docs)
        assert len(docs) == rows
        assert len(tasks[name].doc_to_choice(docs[0])) >= 2
        target, text = tasks[name].doc_to_target(docs[0]), tasks[name].doc_to_text(docs[0])
        assert (isinstance(text, str) and text.strip() and isinstance(target, int)) or name == "winogrande_local"


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data sits beside the checkout in CI")
def test_the_shared_tasks_load_offline(tmp_path):
    tasks = load_tasks(tmp_path, SHARED_DATA, SHARED_ROWS)
    assert {name: len(list(tasks[name].eval_docs)) for name in SHARED_ROWS} == SHARED_ROWS
    assert tasks["mmlu_local"].config.num_fewshot == 5 and len(list(tasks["mmlu_local"].fewshot_docs())) == 285


def test_seeded_subsets_are_the_same_questions_for_every_model_and_every_question_is_kept(tmp_path):
    """Two models answer the same seeded subset; each question's acc is kept, and their mean is lm-eval's acc."""
    assert subset(100, 10, 0, "t") == subset(100, 10, 0, "t") != subset(100, 10, 1, "t")
    assert subset(100, 10, 0, "t") != subset(100, 10, 0, "u") and subset(5, 10, 0, "t") == [0, 1, 2, 3, 4]
    (tmp_path / "arc").mkdir()
    rows = [
        {
            "id": str(i),
            "question": f"w{i} w{i + 1}",
            "choices": {"text": [f"w{j}" for j in range(4)], "label": list("ABCD")},
            "answerKey": "ABCD"[i % 4],
        }
        for i in range(30)
    ]
    (tmp_path / "arc" / "ARC-Easy-test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    include = render_tasks(tmp_path / "tasks", data_dir=tmp_path)
    tokenizer, found = tiny_tokenizer(), []
    for seed in (0, 1):
        results, items = lm_eval_tasks(
            tiny_model(dtype=torch.float32, seed=seed),
            tokenizer,
            ["arc_easy_local"],
            include,
            batch_size=4,
            questions={"arc_easy_local": 12},
            seed=3,
        )
        found.append(items["arc_easy_local"])
        assert results["arc_easy_local"]["acc"] == pytest.approx(sum(found[-1]["acc"]) / 12)
    assert found[0]["doc_id"] == found[1]["doc_id"] == subset(30, 12, 3, "arc_easy_local")
    assert found[0]["choices"] == [4] * 12 and set(found[0]["acc"]) <= {0.0, 1.0}


def test_wikitext_perplexity_is_the_mean_over_its_blocks(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_bytes("\r\n".join(" ".join(f"w{(i * 7 + j) % 90}" for j in range(20)) for i in range(12)).encode())
    assert wikitext_text(path).count("\n") == 11
    summary, items = wikitext_perplexity(tiny_model(dtype=torch.float32), tiny_tokenizer(), path, tokens=200, block=50)
    assert summary["blocks"] == 4 and summary["tokens"] == 4 * 49 and len(items["nll"]) == 4
    assert summary["perplexity"] == pytest.approx(torch.tensor(items["nll"]).mean().exp().item(), rel=1e-6)
    assert (DATA / "wikitext-2-raw" / "wiki.test.raw").read_bytes().count(b"\r\n") == 2891  # the layout read here


def test_the_default_reads_only_what_data_ships():
    settings = EvaluateSettings()
    for task in settings.tasks:
        assert all(present(path) for path in task_files(local_tasks()[task], settings.data_dir)), task


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(tasks=["arc_easyy_local"]), "evaluate.tasks[0]: 'arc_easyy_local' is not a local task (allowed: "),
        (dict(tasks=["piqa_local"], data_dir=None), "evaluate.tasks[0]: piqa_local needs evaluate.data_dir"),
        (dict(data_dir="nowhere"), "evaluate.data_dir: 'nowhere' is not a directory"),
        (
            dict(tasks=["mmlu_local"], questions={}),
            "evaluate.tasks[0]: mmlu_local reads data/mmlu/test/*_test.csv, which",
        ),
        (dict(questions={"piqa_local": 0}), "evaluate.questions.piqa_local: 0 is not a count of questions (>= 1)"),
        (dict(wikitext="data/wiki.txt"), "evaluate.wikitext: 'data/wiki.txt' not found"),
        (dict(tasks=["not_a_task"], questions={}), "evaluate.tasks: 'not_a_task' is neither a task of cqil/tasks/"),
    ],
)
def test_bad_settings_fail_with_one_line(settings, message):
    with pytest.raises(CqilError) as err:
        EvaluateSettings(**settings)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_corpus_tasks_run_on_a_tiny_model(tmp_path):
    """The tasks built from the corpus's own test blocks: rolling perplexity and a 4-way cloze."""
    blocks = torch.randint(4, 96, (6, 12), generator=torch.Generator().manual_seed(0))
    tokenizer = tiny_tokenizer()
    folder = build_corpus_tasks(blocks, tokenizer, tmp_path / "data", seed=1)
    cloze = [json.loads(line) for line in (folder / "cloze.jsonl").read_text().splitlines()]
    assert len(cloze) == 6 and all(len(row["choices"]) == 4 for row in cloze)
    truth = [tokenizer.decode(b[6:]) for b in blocks]
    assert all(row["choices"][row["answer"]] == truth[i] for i, row in enumerate(cloze))
    include = render_tasks(tmp_path / "tasks", corpus_tasks=folder)
    assert sorted(p.name for p in include.glob("*.yaml")) == ["cqil_cloze.yaml", "cqil_heldout.yaml"]
    results, items = lm_eval_tasks(
        tiny_model(dtype=torch.float32), tokenizer, ["cqil_heldout", "cqil_cloze"], include, batch_size=4
    )
    assert results["cqil_cloze"]["sample_len"] == 6 and 0 <= results["cqil_cloze"]["acc"] <= 1
    assert results["cqil_heldout"]["word_perplexity"] > 1 and len(items["cqil_cloze"]["acc"]) == 6
