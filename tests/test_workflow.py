"""The Snakemake DAG: config validation, dry-runs, and one real run on the embedded default (small)."""

import copy
import json
import re
import subprocess
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import checkout_copy, rendered

from cqil.config import check_config
from cqil.errors import ConfigError, CqilError
from cqil.plan import Plan
from cqil.stages import SECTIONS, settings

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def snakemake(*args, check=True, cwd=ROOT):
    result = subprocess.run(["snakemake", "--cores", "2", *args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def jobs(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry-run, as {rule: count}."""
    table = output.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:]
    return {rule: int(count) for rule, count in (line.split() for line in table)}


def edited(path: str, value):
    config = copy.deepcopy(DEFAULT)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return config


def test_default_config_is_valid():
    check_config(DEFAULT, SCHEMA)


def test_each_section_is_its_stages_settings_and_restates_their_defaults():
    """A stage's settings are built from its config section whole (no key left out on the way); config.yaml
    states every default, the same as the settings class, so the two cannot drift apart."""
    for section, cls in SECTIONS.items():
        assert asdict(settings(cls, DEFAULT[section], section)) == asdict(cls()), section
    with pytest.raises(CqilError, match=r"^latency.models: not a setting of this stage \(allowed: prompt_lengths, "):
        settings(SECTIONS["latency"], {"models": ["smollm2-135m"]}, "latency")  # a workflow key: latency_setups


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("run", "two words", "config.run: 'two words' does not match"),
        ("device", "gpu", "config.device: 'gpu' is not one of ['auto', 'cpu', 'cuda']"),
        ("corpus.source", "web", "config.corpus.source: 'web' is not one of ['generate', 'files', 'hub']"),
        ("corpus.sourse", "generate", "config.corpus: Additional properties are not allowed ('sourse' was unexpected)"),
        ("corpus.blocks.test", 0, "config.corpus.blocks.test: 0 is less than the minimum of 1"),
        ("search.sizes", [2, "3"], "config.search.sizes[1]: '3' is not of type 'integer'"),
        ("search.sizes", [1], "config.search.sizes[0]: 1 is less than the minimum of 2"),
        ("select.metric", "bleu", "config.select.metric: 'bleu' is not one of ['kl', 'perplexity', 'top1']"),
        ("search.include", ["S18-E28"], "config.search.include[0]: 'S18-E28' does not match"),
        ("catalog.smollm2-135m.layers", "30", "config.catalog.smollm2-135m.layers: '30' is not of type 'integer'"),
        ("resources.default.gpu", -1, "config.resources.default.gpu: -1 is less than the minimum of 0"),
        ("sensitivity", None, "config: 'sensitivity' is a required property"),
        # checks that need the layer count of each model
        ("search.ends", [26, 32], "config.search.ends[1]: 32 does not fit model 'smollm2-135m' with 30 layers"),
        (
            "search.include",
            ["S18-E32-P2-D0"],
            "config.search.include[0]: plan S18-E32-P2-D0: E=32 exceeds the model's 30 layers",
        ),
        (
            "select.always",
            ["S18-E28-P3-D0"],
            "config.select.always[0]: plan S18-E28-P3-D0: E-S=10 must be a multiple of P=3",
        ),
        ("models", ["llama-7b"], "config.models[0]: 'llama-7b' is not in config.catalog (smollm2-135m, llama-135m)"),
        ("latency_setups.tp_degrees", [1], "config.latency_setups.tp_degrees[0]: 1 is less than the minimum of 2"),
        ("latency_setups.models", ["llama-7b"], "config.latency_setups.models[0]: 'llama-7b' is not in config.catalog"),
        (
            "latency_setups.plans",
            ["S12-E32-P2-D0"],
            "config.latency_setups.plans[0]: plan S12-E32-P2-D0: E=32 exceeds the model's 30 layers",
        ),
        ("simulate.plans", {"llama-8b": []}, "config.simulate.plans: unknown shape 'llama-8b'"),
        ("simulate.hardware", ["TPU"], "config.simulate.hardware: unknown preset 'TPU'"),
        (
            "catalog.smollm2-135m.heads",
            None,
            "config.catalog.smollm2-135m: needs heads for config.latency_setups.tp_degrees",
        ),
        ("search.sizes", [11], "config.search: the grid has no valid plan for model 'smollm2-135m'"),
        # checks that the stages' settings make, before any job
        ("corpus.files", ["nowhere.txt"], "config.corpus.files[0]: 'nowhere.txt' not found"),
        (
            "evaluate.tasks",
            ["arc_easyy_local"],
            "config.evaluate.tasks[0]: 'arc_easyy_local' is not a local task (allowed: arc_challenge_local, ",
        ),
        ("evaluate.tasks", ["not_a_task"], "config.evaluate.tasks: 'not_a_task' is neither a task of cqil/tasks/"),
        (
            "evaluate.data_dir",
            "cqil",
            "config.evaluate.tasks[0]: arc_easy_local reads cqil/arc/ARC-Easy-test.jsonl, which is not there",
        ),
        ("evaluate.data_dir", "nowhere", "config.evaluate.data_dir: 'nowhere' is not a directory"),
        (
            "track.min_effects",
            {"kl": {"min_effect": 0.1}},
            "config.track.min_effects.kl: 'direction' is a required property",
        ),
    ],
)
def test_bad_config_fails_with_one_line(path, value, message):
    config = edited(path, value)
    if path == "search.sizes" and value == [11]:
        config["search"]["include"] = []
    with pytest.raises(ConfigError) as err:
        check_config(config, SCHEMA)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_snakemake_reports_a_bad_config_before_any_job(tmp_path):
    (tmp_path / "bad.yaml").write_text("search:\n  ends: [26, 40]\n")
    result = snakemake("-n", "--configfile", str(tmp_path / "bad.yaml"), check=False)
    assert result.returncode != 0
    assert "cqil: error: config.search.ends[1]: 40 does not fit model 'smollm2-135m'" in result.stdout + result.stderr


def test_dry_run_of_the_default():
    out = snakemake("-n", "--config", "run=dryrun").stdout
    assert jobs(out) == {
        "prepare_model": 2,
        "corpus": 1,
        "similarity": 1,
        "sensitivity": 1,
        "search": 1,
        "select": 1,
        "figures": 1,
        "selected_scores": 1,
        "finetuned": 1,
        "quality": 1,
        "latency": 5,
        "latency_table": 2,
        "simulate": 1,
        "tables": 1,
        "track": 1,
        "dashboard": 1,
        "all": 1,
        "total": 23,
    }  # per-plan jobs come after `select`
    # latency: smollm2-135m has 9 heads, so no tp-2; the random llama-135m (8 heads) gets it
    assert "results/dryrun/llama-135m/latency/tp-2.json" in out and "smollm2-135m/latency/tp-2" not in out


def test_dry_run_with_another_model(tiny_dir, tmp_path):
    (tmp_path / "tiny.yaml").write_text(
        yaml.safe_dump(
            {
                "run": "dryrun",
                "models": ["tiny", "smollm2-135m"],
                "catalog": {"tiny": {"spec": str(tiny_dir), "layers": 8}},
                "search": {"starts": [2, 4], "ends": [6, 8], "sizes": [2], "include": []},
            }
        )
    )
    out = snakemake("-n", "--configfile", str(tmp_path / "tiny.yaml")).stdout
    assert jobs(out)["corpus"] == 2 and jobs(out)["search"] == 2
    assert f"--model {tiny_dir}" in out and "results/dryrun/tiny/search.csv" in out


def test_dry_run_of_the_paper_config():
    """The paper's setup plans its whole DAG offline: four Hub models, their official plans, GPUs per job."""
    out = snakemake("-n", "-p", "--configfile", "config/paper.yaml").stdout
    counts = jobs(out)
    assert counts["prepare_model"] == 4 and counts["search"] == 4 and counts["simulate"] == 1
    # 7B: original, S12-E30-P2-D0 (latency_setups.plans) + its 3 official plans, tp 2 and 4; 13B: 4; 33B, Qwen: 5 each
    assert counts["latency"] == 6 + 4 + 5 + 5
    assert "--model huggyllama/llama-7b" in out and "results/paper/qwen1.5-14b/latency/cqil-S17-E37-P2-D0.json" in out
    job = out.split("output: results/paper/llama-33b/latency/cqil-S18-E58-P4-D0.json")[1].split("\n\n")[0]
    assert "gpu=4" in job and "slurm_partition=gpu" in job  # partitions are config values
    assert "HF_HUB_OFFLINE=1 cqil latency --device auto " in job  # a GPU job: weights fetched by prepare_model
    # 7B's search scores its plans; the official D1 adapter was trained with the official code's arithmetic
    assert '"include": ["S12-E30-P2-D0", "S12-E30-P2-D1-official", "S14-E30-P4-D0"]' in out
    # config.yaml's CPU-sized entries do not leak into the paper's resources (Snakemake merges them key by key)
    job = out.split("output: results/paper/llama-7b/sensitivity.csv")[1].split("\n\n")[0]
    assert "gpu=1" in job and "mem_mb=16000" in job and "HF_HUB_OFFLINE=1 cqil" in job
    assert "prepare_tasks" in counts  # SciQ and MMLU fetched on a CPU job
    assert "../shared" not in (ROOT / "config" / "paper.yaml").read_text()  # every path is in the repository


def test_dry_run_of_the_gemma3_overlay():
    """The second family's overlay plans its DAG on the embedded Gemma 3 model, in its own run (the baselines and
    the later stages follow the `select` checkpoint, so a dry run lists them only once it has run)."""
    out = snakemake("-n", "-p", "--configfile", "config/gemma3.yaml", "--config", "run=gemma3-dry").stdout
    counts = jobs(out)  # a run of its own: the committed results/gemma3 would leave nothing to plan
    assert counts["prepare_model"] == 1 and counts["search"] == 1 and counts["select"] == 1
    assert "--model gemma3-270m --layers 18" in out and "results/gemma3-dry/gemma3-270m/search.csv" in out
    assert "gemma3-dry/smollm2-135m" not in out and "gemma3-dry/llama-135m" not in out  # the default's models: no jobs


def test_lint():
    """Snakemake's linter finds nothing but its advice to give each rule a conda env (one env serves all)."""
    result = snakemake("--lint", check=False)
    text = result.stdout + result.stderr
    found = re.findall(r"^Lints for rule (\w+) .*:\n((?:    \*.*\n(?:      .*\n)*\n?)+)", text, re.M)
    rules = set(
        re.findall(
            r"^(?:rule|checkpoint) (\w+):", "".join(p.read_text() for p in (ROOT / "workflow").rglob("*.smk")), re.M
        )
    )
    assert result.returncode == 1 and "General lints" not in text, text  # 1: it found the one kind of lint below
    assert {rule for rule, _ in found} == rules and len(rules) >= 15
    titles = {title for _, lints in found for title in re.findall(r"^    \* (.*):$", lints, re.M)}
    assert titles == {"Specify a conda environment or container for each rule."}


@pytest.mark.slow
def test_real_run_on_the_default_model(tmp_path):
    """The whole DAG on SmolLM2-135M with small settings and the baselines overlay; then nothing to redo; then only
    what a change touches.

    It runs in a copy of the checkout (results/, resources/, logs/ and the history are written there). One pruning
    rule: a second rule's variant takes the same path through the DAG (tests/test_baselines.py runs both)."""
    repo = checkout_copy(tmp_path / "repo")
    (tmp_path / "one_rule.yaml").write_text("baselines:\n  rules: [block_influence]\n")
    overlay = ["config/baselines.yaml", str(tmp_path / "one_rule.yaml")]
    small = ["--configfile", "tests/data/small.yaml", *overlay, "--config", "run=pytest"]

    def run(*args, **kwargs):
        return snakemake(*args, cwd=repo, **kwargs)

    run(*small)
    out = repo / "results" / "pytest" / "smollm2-135m"
    search = pd.read_csv(out / "search.csv")
    assert {"plan", "size", "bypass", "ideal_reduction", "perplexity", "kl", "top1", "ppl_ratio"} <= set(search.columns)
    assert len(search) == 1 + 4  # the original and the grid S16/S18 x E28 x P2 x D0/D1
    assert (search.loc[search.plan != "original", "kl"] > 0).all()
    similarity = pd.read_csv(out / "similarity.csv")
    assert len(similarity) == 30 * 30 and similarity.cosine.max() <= 1 + 1e-9
    selected = json.loads((out / "selected.json").read_text())["plans"]
    assert len(selected) == 1  # the best P2 plan: the baselines match it
    plan = selected[0]
    scores = pd.read_csv(out / "selected_scores.csv")
    assert scores.plan.tolist() == ["original", *selected]
    for name in ("similarity_heatmap", "similarity_adjacent", "sensitivity", "frontier"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 10_000
    finetuned = pd.read_csv(out / "finetuned.csv")
    assert finetuned.plan.tolist() == selected and (finetuned.steps == 3).all()
    assert (finetuned.kl_before > 0).all() and finetuned.kl_after.notna().all()
    assert (out / "plans" / plan / "loss.png").exists()
    adapter = repo / "resources" / "pytest" / "smollm2-135m" / "plans" / plan / "finetune" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    quality = pd.read_csv(out / "quality.csv")
    variants = set(zip(quality.plan, quality.stage))
    assert variants == {("original", "original"), (plan, "zeroshot"), (plan, "finetuned")}
    tasks = {"arc_easy_local", "arc_challenge_local", "piqa_local", "winogrande_local", "openbookqa_local", "wikitext2"}
    assert set(quality.task) == {"heldout"} | tasks and (out / "quality.md").exists()
    assert quality[quality.task == "arc_easy_local"].n.eq(24).all()  # the seeded subset of tests/data/small.yaml
    differences = pd.read_csv(out / "quality_diff.csv")  # every variant against the original, paired
    assert set(zip(differences.plan, differences.stage)) == variants - {("original", "original")}
    assert tasks <= set(differences.task) and (differences.low <= differences["diff"]).all()
    assert (out / "figures" / "quality_tradeoff.png").stat().st_size > 10_000
    heldout = quality[(quality.task == "heldout") & (quality.metric == "kl")].set_index(["plan", "stage"]).value
    assert heldout[("original", "original")] == 0 and len(heldout) == 3
    # the original at 1 and 2 threads; SmolLM2: cqil S16-E28-P2-D0 (latency_setups) and the compared variants (the
    # selected plan, its LP, its pruned model); the random llama-135m: cqil S16-E28-P2-D0 and tp (its heads divide)
    for model, setups in (("smollm2-135m", 4 + len({"S16-E28-P2-D0", plan})), ("llama-135m", 4)):
        latency = pd.read_csv(repo / "results" / "pytest" / model / "latency.csv")
        assert latency.setup.nunique() == setups
        assert (latency.check_max_abs_diff.dropna() < 1e-4).all() and latency.check_max_abs_diff.notna().any()
        assert (repo / "results" / "pytest" / model / "figures" / "latency.png").stat().st_size > 10_000
    history = [json.loads(line) for line in (repo / "results" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["config"] == "pytest" and history[-1]["metrics"]["smollm2-135m/search/plans_per_minute"] > 0
    validation = pd.read_csv(repo / "results" / "pytest" / "simulation" / "validation.csv")
    assert set(validation.model) == {"smollm2-135m", "random:llama-135m"} and validation.error.notna().all()
    provenance = json.loads((out / "search.json").read_text())["provenance"]
    assert provenance["settings"]["settings"]["sizes"] == [2] and provenance["git"]

    # The baselines, matched to the selected plan: pruning and LP through the same stages
    baselines = json.loads((out / "baselines.json").read_text())
    assert {row["rule"] for row in baselines["baselines"]} == {"block_influence", "lp"}
    assert len(baselines["evidence"]["block_influence"]) == 30
    comparison = pd.read_csv(out / "comparison.csv")
    assert set(zip(comparison.method, comparison.stage)) == {
        (method, stage) for method in ("CQIL", "LP", "pruned (ShortGPT BI)") for stage in ("zeroshot", "finetuned")
    }
    assert (comparison.depth == Plan.parse(plan).steps(30)).all()  # equal sequential depth
    assert comparison.set_index("method").gpus.to_dict()["LP"] == 2 and comparison.gpus.min() == 1
    assert (comparison.average_low <= comparison.average_diff).all() and comparison.wikitext2_ppl.notna().all()
    assert comparison.prefill_16_reduction.notna().all() and comparison.decode_reduction.notna().all()  # all timed
    assert (out / "figures" / "comparison.png").stat().st_size > 10_000
    # the claims table across models reads such a run: CQIL and its matched baselines, each against CQIL, paired
    claims = tmp_path / "claims" / "claims.csv"
    figure = claims.with_suffix(".png")
    subprocess.run(["cqil", "claims", str(out), "--out", str(claims), "--figure", str(figure)], check=True)
    table = pd.read_csv(claims)
    assert len(table) == 2 * 3 and set(table.plan) == {plan} and set(table.method) == set(comparison.method)
    assert table[table.method == "CQIL"].vs_cqil_diff.isna().all()
    models = pd.read_csv(claims.with_name("claims_models.csv"))
    assert models.layers.tolist() == [30] and len(models.least_sensitive_layers[0].split()) == 3
    assert figure.stat().st_size > 10_000

    # the HTML report: every figure and table with its caption, one self-contained page that a browser renders
    report = tmp_path / "report.html"
    run(*small, "--report", str(report))
    html = report.read_text()
    assert report.stat().st_size > 200_000 and "CQIL (Concurrent Computation of Quasi-Independent Layers" in html
    for caption in ("Mean cosine similarity of the inputs", "analytic model fitted on this machine", "official value"):
        assert caption in html, caption

    again = run(*small, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout + again.stderr

    changed = jobs(run(*small, "select={'metric': 'top1'}", "-n").stdout)
    assert "search" not in changed and "corpus" not in changed and changed["select"] == 1
    # a fine-tuning job with several GPUs is launched by torchrun, a process per GPU
    (tmp_path / "gpus.yaml").write_text("resources:\n  finetune: {gpu: 2}\n")
    multi = run(
        "--configfile", "tests/data/small.yaml", str(tmp_path / "gpus.yaml"), "--config", "run=pytest", "-n", "-p"
    ).stdout
    threads = DEFAULT["resources"]["finetune"]["threads"]
    assert f"torchrun --standalone --nproc_per_node 2 -m cqil --threads {threads} finetune" in multi
    # latency jobs on GPUs ask for one per rank
    (tmp_path / "gpus.yaml").write_text("resources:\n  latency: {gpu: 1}\n")
    multi = run(
        "--configfile", "tests/data/small.yaml", str(tmp_path / "gpus.yaml"), "--config", "run=gpus", "-n", "-p"
    ).stdout
    for setup, gpus in (("original", 1), ("cqil-S16-E28-P2-D0", 2), ("tp-2", 2)):
        job = multi.split(f"output: results/gpus/llama-135m/latency/{setup}.json")[1].split("Shell command")[0]
        assert f"gpu={gpus}" in job, job
    rendered(report, tmp_path / "report.png")  # last: it skips where no browser is installed
