"""Evaluation on real data: the task YAMLs load offline from data/, every question's score is kept, subsets are
seeded, WikiText-2 perplexity, and bad settings fail before any model loads."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SHARED_DATA, tiny_model, tiny_tokenizer

from cqil.errors import CqilError
from cqil.evaluate import (
    EvaluateSettings,
    build_corpus_tasks,
    hub_tasks,
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
HUB_GROUPS = ["mmlu_5shot"]  # groups of lm-eval's Hub tasks: they read no file of ours


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the datasets cache of the JSON/CSV files


def test_task_yamls_render_with_absolute_paths(tmp_path):
    out = render_tasks(tmp_path / "tasks", data_dir=os.path.relpath(DATA))
    rendered = sorted(p.name for p in out.glob("*.yaml"))
    assert rendered == sorted(f"{n}.yaml" for n in [*ROWS, *SHARED_ROWS, *HUB_GROUPS])  # not cqil_*
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
    assert sorted(p.name for p in include.glob("*.yaml")) == ["cqil_cloze.yaml", "cqil_heldout.yaml", "mmlu_5shot.yaml"]
    results, items = lm_eval_tasks(
        tiny_model(dtype=torch.float32), tokenizer, ["cqil_heldout", "cqil_cloze"], include, batch_size=4
    )
    assert results["cqil_cloze"]["sample_len"] == 6 and 0 <= results["cqil_cloze"]["acc"] <= 1
    assert results["cqil_heldout"]["word_perplexity"] > 1 and len(items["cqil_cloze"]["acc"]) == 6


def test_the_paper_config_fetches_the_hub_data_of_its_tasks():
    """prepare_tasks fetches lm-eval's own tasks and those our groups wrap; never ours or the corpus's."""
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["evaluate"]["tasks"]
    assert "mmlu_5shot" in paper and "mmlu" not in paper  # the paper's MMLU is 5-shot
    assert hub_tasks(paper) == ["sciq", "mmlu"]
    assert hub_tasks(["arc_easy_local", "cqil_cloze", "mmlu_local"]) == []


def mmlu_stand_in(root, test_rows=2, dev_rows=6):
    """A local folder `cais/mmlu` in the layout of the Hub dataset (a config per subject; question, subject,
    choices, answer) with a few rows per split: what `datasets.load_dataset("cais/mmlu", subject)` reads when
    the working directory holds it. Returns the subjects, from lm-eval's own mmlu task files."""
    import lm_eval

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    subjects = sorted(yaml.safe_load(path.read_text())["dataset_name"] for path in folder.glob("mmlu_*.yaml"))
    configs = []
    for subject in subjects:
        (root / subject).mkdir(parents=True)
        for split, count in (("test", test_rows), ("dev", dev_rows)):
            rows = [
                {
                    "question": f"w{i} {split} {subject}?",
                    "subject": subject,
                    "choices": ["w1", "w2", "w3", "w4"],
                    "answer": i % 4,
                }
                for i in range(count)
            ]
            (root / subject / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        files = [{"split": split, "path": f"{subject}/{split}.jsonl"} for split in ("test", "dev")]
        configs.append({"config_name": subject, "data_files": files})
    (root / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}) + "---\n")
    return subjects


def test_mmlu_5shot_is_lm_evals_mmlu_with_five_examples_of_each_subject_scored_as_one_task(tmp_path, monkeypatch):
    """The paper's MMLU from a local stand-in of cais/mmlu: every subject's question follows lm-eval's subject
    description and the first five questions of the same subject's dev split; the 57 subjects come back as one
    task whose accuracy is the mean over all questions."""
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)  # lm-eval's dataset_path cais/mmlu: a folder of the working directory
    subjects = mmlu_stand_in(tmp_path / "cais" / "mmlu")
    include = render_tasks(tmp_path / "tasks")
    loaded = TaskManager(include_path=str(include)).load(["mmlu_5shot"])
    assert len(subjects) == 57 and sorted(loaded["tasks"]) == sorted(f"mmlu_{s}" for s in subjects)
    assert {task.config.num_fewshot for task in loaded["tasks"].values()} == {5}
    anatomy = loaded["tasks"]["mmlu_anatomy"]
    shots = "".join(f"w{i} dev anatomy?\nA. w1\nB. w2\nC. w3\nD. w4\nAnswer: {'ABCD'[i % 4]}\n\n" for i in range(5))
    expected = "The following are multiple choice questions (with answers) about anatomy.\n\n" + shots
    assert (
        anatomy.fewshot_context(anatomy.eval_docs[1], 5)
        == expected + "w1 test anatomy?\nA. w1\nB. w2\nC. w3\nD. w4\nAnswer:"
    )

    model, tokenizer = tiny_model(dtype=torch.float32), tiny_tokenizer()
    with pytest.raises(CqilError, match=r"^evaluate.questions.mmlu_5shot: 100 of its 114 questions, but a group"):
        lm_eval_tasks(model, tokenizer, ["mmlu_5shot"], include, questions={"mmlu_5shot": 100})
    results, items = lm_eval_tasks(model, tokenizer, ["mmlu_5shot"], include, questions={"mmlu_5shot": 114})
    assert list(items) == ["mmlu_5shot"] and items["mmlu_5shot"]["doc_id"] == list(range(114))
    assert items["mmlu_5shot"]["choices"] == [4] * 114 and "acc_norm" not in items["mmlu_5shot"]
    assert results["mmlu_5shot"]["acc"] == pytest.approx(sum(items["mmlu_5shot"]["acc"]) / 114)
