rule sensitivity:
    input:
        rules.corpus.output.blocks,
    output:
        table=f"{RESULTS}/sensitivity.csv",
        summary=f"{RESULTS}/sensitivity.json",  # written beside the table, with its provenance
    log:
        log_path("sensitivity"),
    benchmark:
        log_path("sensitivity", "benchmark.tsv")
    threads: res("sensitivity", "threads")
    resources:
        **job_resources("sensitivity"),
    params:
        env=hub_env("sensitivity"),
        device=config["device"],
        spec=spec,
        dtype=dtype,
        settings=settings("sensitivity"),
    shell:
        "{params.env}cqil --threads {threads} sensitivity --device {params.device} --settings {params.settings}"
        " --model {params.spec:q} --dtype {params.dtype} --corpus {input} --out {output.table} > {log} 2>&1"
