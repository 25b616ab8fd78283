rule search:
    input:
        rules.corpus.output.blocks,
    output:
        table=f"{RESULTS}/search.csv",
        summary=f"{RESULTS}/search.json",  # written beside the table, with its provenance
    log:
        log_path("search"),
    benchmark:
        log_path("search", "benchmark.tsv")
    threads: res("search", "threads")
    resources:
        **job_resources("search"),
    params:
        env=hub_env("search"),
        device=config["device"],
        spec=spec,
        dtype=dtype,
        settings=model_settings("search", "include"),
    shell:
        "{params.env}cqil --threads {threads} search --device {params.device} --settings {params.settings}"
        " --model {params.spec:q} --dtype {params.dtype} --corpus {input} --out {output.table} > {log} 2>&1"


# The plans chosen here fan out to the later stages (scores now; fine-tuning, evaluation, latency next).
checkpoint select:
    input:
        rules.search.output.table,
    output:
        f"{RESULTS}/selected.json",
    log:
        log_path("select"),
    benchmark:
        log_path("select", "benchmark.tsv")
    threads: 1
    params:
        settings=model_settings("select", "always"),
    shell:
        "cqil select --settings {params.settings} --search {input} --out {output} > {log} 2>&1"


rule score:
    input:
        rules.corpus.output.blocks,
    output:
        f"{RESULTS}/plans/{{plan}}/scores.json",
    log:
        log_path("score", job="{model}/{plan}"),
    benchmark:
        log_path("score", "benchmark.tsv", job="{model}/{plan}")
    threads: res("score", "threads")
    resources:
        **job_resources("score"),
    params:
        env=hub_env("score"),
        device=config["device"],
        spec=spec,
        dtype=dtype,
        settings=settings("score"),
    shell:
        "{params.env}cqil --threads {threads} score --device {params.device} --settings {params.settings}"
        " --model {params.spec:q} --dtype {params.dtype} --plan {wildcards.plan} --corpus {input} --out {output}"
        " > {log} 2>&1"


rule selected_scores:
    input:
        for_selected_plans(f"{RESULTS}/plans/{{plan}}/scores.json"),
    output:
        f"{RESULTS}/selected_scores.csv",
    log:
        log_path("selected_scores"),
    threads: 1
    shell:
        "cqil scores-table {input} --out {output} > {log} 2>&1"
