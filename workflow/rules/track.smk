# The last stage: this run's key metrics appended to the history (results/history.jsonl), which only
# ever grows; `cqil track compare` reads it. Runs again whenever any table or figure before it changed.
rule track:
    input:
        final_targets(),
    output:
        f"results/{config['run']}/track/record.json",
    log:
        log_path("track", job=None),
    threads: 1
    params:
        settings=settings("track"),
        history="results/history.jsonl",  # every run's record, appended: not a file of this run
        config=shlex.quote(json.dumps(config, sort_keys=True, default=str)),
        run_dir=run_folder,
        logs=LOGS,
        name=config["run"],
    shell:
        "cqil track record --settings {params.settings} --run-dir {params.run_dir} --logs {params.logs}"
        " --config {params.config} --config-name {params.name} --history {params.history} --out {output} > {log} 2>&1"


# The history as one static HTML page: a trend per metric with its band and change points (cqil/tracking/dashboard.py).
rule dashboard:
    input:
        rules.track.output,
    output:
        f"results/{config['run']}/track/dashboard.html",
    log:
        log_path("dashboard", job=None),
    threads: 1
    params:
        settings=settings("track"),
        history="results/history.jsonl",
    shell:
        "cqil track dashboard --settings {params.settings} --history {params.history} --out {output} > {log} 2>&1"
