"""Benchmark tracking: one record per pipeline run in an append-only history, compared run to run.

    cqil track record --run-dir results/default --logs logs/default --history results/history.jsonl
    cqil track compare --history results/history.jsonl --baseline v0.1 --fail-on-regression --confirm

- `track.py`: the stage `cqil track <action>`, one run function per action (record, compare, dashboard, trends);
- `settings.py`: the config section `track`: which rule judges each metric kind;
- `history.py`: a run's record from its artifacts, and the history file (append only);
- `compare.py`: two records compared metric by metric, and a latency regression confirmed by timing it again;
- `verdict.py`: is a change real? a verdict per metric from repeats, intervals or the history's spread;
- `dashboard.py`: the history as one HTML page of trends;
- `environment.py`: the installed packages against the lock (what changed between two records).

Tracking is the last stage: it reads what the others wrote (latency results through cqil/latency/table.py)
and nothing imports it back. Whether the machine was busy while a latency was timed is decided when it is
timed (cqil/latency/contention.py); a record only carries the flag.
"""
