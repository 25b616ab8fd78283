rule similarity:
    input:
        rules.corpus.output.blocks,
    output:
        table=f"{RESULTS}/similarity.csv",
        summary=f"{RESULTS}/similarity.json",  # written beside the table, with its provenance
    log:
        log_path("similarity"),
    benchmark:
        log_path("similarity", "benchmark.tsv")
    threads: res("similarity", "threads")
    resources:
        **job_resources("similarity"),
    params:
        env=hub_env("similarity"),
        device=config["device"],
        spec=spec,
        dtype=dtype,
        settings=settings("similarity"),
    shell:
        "{params.env}cqil --threads {threads} similarity --device {params.device} --settings {params.settings}"
        " --model {params.spec:q} --dtype {params.dtype} --corpus {input} --out {output.table} > {log} 2>&1"
