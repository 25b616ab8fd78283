rule similarity:
    input:
        rules.corpus.output.blocks,
    output:
        table=f"{RESULTS}/similarity.csv",
        summary=f"{RESULTS}/similarity.json",  # written beside the table, with its provenance
    params:
        spec=spec,
        dtype=dtype,
        split=config["similarity"].get("split", "calibration"),
        batch_size=config["similarity"].get("batch_size", 4),
    log:
        log_path("similarity"),
    benchmark:
        log_path("similarity", "benchmark.tsv")
    threads: res("similarity", "threads")
    resources:
        **job_resources("similarity"),
    shell:
        "cqil --threads {threads} similarity --model {params.spec:q} --dtype {params.dtype} --corpus {input}"
        " --split {params.split} --batch-size {params.batch_size} --out {output.table} > {log} 2>&1"
