"""Benchmark tracking on synthetic histories: direction-aware thresholds, corrupt lines, the CI gate."""

import json

import pytest

from cqil.cli import main
from cqil.track import TrackSettings, append, benchmark_json, compare, find, load, package_changes

BASE = {
    "m/S16-E28-P2-D0/zeroshot/heldout/kl": 0.40,
    "m/S16-E28-P2-D0/zeroshot/heldout/top1": 0.70,
    "m/latency/cqil S12-E28-P2-D0/prefill-512/reduction": 0.20,
    "stage/search/m/seconds": 100.0,
    "m/unknown_kind": 1.0,
}


def entry(git, label=None, **changes):
    metrics = {**BASE, **{name.replace("__", "/"): value for name, value in changes.items()}}
    return {"date": "2026-11-23T00:00:00+00:00", "git": git, "label": label, "dirty": False, "metrics": metrics}


def statuses(new, old, settings=None):
    settings = settings or TrackSettings()
    return dict(zip(*compare(new, old, settings)[["metric", "status"]].T.to_numpy()))


def test_direction_aware_thresholds():
    old = entry("a" * 40)
    noisy = entry(
        "b" * 40,
        **{
            "m__S16-E28-P2-D0__zeroshot__heldout__kl": 0.42,  # +5% KL: within 10%
            "stage__search__m__seconds": 140.0,
        },
    )  # +40% time: within 50%
    assert set(statuses(noisy, old).values()) <= {"ok", "untracked"}
    worse = entry(
        "c" * 40,
        **{
            "m__S16-E28-P2-D0__zeroshot__heldout__kl": 0.50,  # +25% KL: lower is better
            "m__S16-E28-P2-D0__zeroshot__heldout__top1": 0.65,  # -5 points: higher is better
            "m__latency__cqil S12-E28-P2-D0__prefill-512__reduction": 0.10,
        },
    )
    found = statuses(worse, old)
    assert [name for name, status in found.items() if status == "regression"] == [
        "m/S16-E28-P2-D0/zeroshot/heldout/kl",
        "m/S16-E28-P2-D0/zeroshot/heldout/top1",
        "m/latency/cqil S12-E28-P2-D0/prefill-512/reduction",
    ]
    better = entry("d" * 40, **{"m__S16-E28-P2-D0__zeroshot__heldout__kl": 0.30})
    assert statuses(better, old)["m/S16-E28-P2-D0/zeroshot/heldout/kl"] == "improvement"
    assert statuses(old, old)["m/unknown_kind"] == "untracked"
    # thresholds come from config: a tighter one turns the noise above into a regression
    tight = TrackSettings(thresholds={"kl": {"direction": "lower", "tolerance": 0.01}})
    assert statuses(noisy, old, tight)["m/S16-E28-P2-D0/zeroshot/heldout/kl"] == "regression"


def test_changed_package_versions_stand_beside_the_metrics_that_moved(tmp_path, capsys):
    old = entry("a" * 40) | {"packages": {"torch": "2.13.0+cpu", "transformers": "5.23.0", "numpy": "2.4.6"}}
    new = entry("b" * 40, **{"m__S16-E28-P2-D0__zeroshot__heldout__kl": 0.60}) | {
        "packages": {"torch": "2.13.0+cpu", "transformers": "5.24.0", "numpy": "2.4.6", "tokenizers": "0.23.1"}
    }
    assert package_changes(new, old) == ["tokenizers - -> 0.23.1", "transformers 5.23.0 -> 5.24.0"]
    table = compare(new, old, TrackSettings()).set_index("metric")
    assert (
        table.loc["m/S16-E28-P2-D0/zeroshot/heldout/kl", "packages"]
        == "tokenizers - -> 0.23.1; transformers 5.23.0 -> 5.24.0"
    )
    assert table.packages.notna().sum() == 1  # only the metric that moved
    # a record from before every package was stored (six `versions`): only the packages both name count
    legacy = entry("c" * 40) | {"versions": {"torch": "2.13.0+cpu", "transformers": "5.23.0", "lm_eval": "0.4.13"}}
    assert package_changes(new, legacy) == ["transformers 5.23.0 -> 5.24.0"]
    history = tmp_path / "history.jsonl"
    append(history, old)
    append(history, new)
    main(["track", "compare", "--history", str(history)])
    assert "packages changed: tokenizers - -> 0.23.1, transformers 5.23.0 -> 5.24.0" in capsys.readouterr().out


def test_new_and_missing_metrics():
    old, new = entry("a" * 40), entry("b" * 40, **{"m__new__kl": 0.1})
    del new["metrics"]["stage/search/m/seconds"]
    found = statuses(new, old)
    assert found["m/new/kl"] == "new" and found["stage/search/m/seconds"] == "missing"


def test_history_is_append_only_and_a_truncated_line_is_skipped(tmp_path):
    history = tmp_path / "history.jsonl"
    append(history, entry("a" * 40, label="v1"))
    first = history.read_bytes()
    append(history, entry("b" * 40))
    assert history.read_bytes().startswith(first)
    with open(history, "a") as f:
        f.write(json.dumps(entry("c" * 40))[:50])  # a run killed mid-write
    records, problems = load(history)
    assert [r["git"][0] for r in records] == ["a", "b"]
    assert len(problems) == 1 and problems[0].startswith(f"{history}:3: skipped a corrupt line")
    assert find(records, "v1")["git"] == "a" * 40 and find(records, "bbbb")["git"] == "b" * 40


def test_compare_cli_gates_on_regressions(tmp_path, capsys):
    history = tmp_path / "history.jsonl"
    append(history, entry("a" * 40, label="release"))
    append(history, entry("b" * 40))
    append(history, entry("c" * 40, **{"m__S16-E28-P2-D0__zeroshot__heldout__kl": 0.60}))
    with open(history, "a") as f:
        f.write("{not json\n")
    main(["track", "compare", "--history", str(history), "--baseline", "release"])  # reports, exits 0
    out, err = capsys.readouterr()
    assert "skipped a corrupt line" in err and "previous (git bbbbbbbb" in out and "baseline release" in out
    assert out.count("regression") >= 2  # against the previous record and against the baseline
    with pytest.raises(SystemExit) as exit_:
        main(["track", "compare", "--history", str(history), "--fail-on-regression"])
    assert exit_.value.code == 1
    append(history, entry("d" * 40, **{"m__S16-E28-P2-D0__zeroshot__heldout__kl": 0.61}))  # noise after the jump
    main(["track", "compare", "--history", str(history), "--fail-on-regression"])  # no exit
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # a threshold without its direction: one line, not a TypeError
        main(
            ["track", "compare", "--history", str(history), "--settings", '{"thresholds": {"kl": {"tolerance": 0.1}}}']
        )
    assert exit_.value.code == 2 and capsys.readouterr().err == (  # before the history is read
        "cqil: error: track.thresholds.kl: {'tolerance': 0.1} needs the keys direction, tolerance, relative\n"
    )


def test_github_action_benchmark_export_and_trends(tmp_path):
    exported = benchmark_json(entry("a" * 40), TrackSettings())
    smaller = {e["name"] for e in exported["customSmallerIsBetter"]}
    bigger = {e["name"] for e in exported["customBiggerIsBetter"]}
    assert smaller == {"m/S16-E28-P2-D0/zeroshot/heldout/kl", "stage/search/m/seconds"}
    assert bigger == {"m/S16-E28-P2-D0/zeroshot/heldout/top1", "m/latency/cqil S12-E28-P2-D0/prefill-512/reduction"}
    assert all(set(e) == {"name", "unit", "value", "extra"} for e in exported["customBiggerIsBetter"])
    history = tmp_path / "history.jsonl"
    for git, kl in (("a", 0.4), ("b", 0.38), ("c", 0.41)):
        append(history, entry(git * 40, **{"m__S16-E28-P2-D0__zeroshot__heldout__kl": kl}))
    main(["track", "trends", "--history", str(history), "--out-dir", str(tmp_path / "trends")])
    assert json.loads((tmp_path / "trends" / "customSmallerIsBetter.json").read_text())[0]["value"] == 0.41
    for kind in ("kl", "top1", "reduction", "seconds"):
        assert (tmp_path / "trends" / f"trend_{kind}.png").stat().st_size > 10_000
