rule sensitivity:
    input:
        rules.corpus.output.blocks,
    output:
        table=f"{RESULTS}/sensitivity.csv",
        summary=f"{RESULTS}/sensitivity.json",  # written beside the table, with its provenance
    params:
        spec=spec,
        dtype=dtype,
        split=config["sensitivity"].get("split", "calibration"),
        distances=" ".join(map(str, config["sensitivity"].get("distances", [1, 2]))),
        batch_size=config["sensitivity"].get("batch_size", 2),
    log:
        log_path("sensitivity"),
    benchmark:
        log_path("sensitivity", "benchmark.tsv")
    threads: res("sensitivity", "threads")
    resources:
        **job_resources("sensitivity"),
    shell:
        "cqil --threads {threads} sensitivity --model {params.spec:q} --dtype {params.dtype} --corpus {input}"
        " --split {params.split} --distances {params.distances} --batch-size {params.batch_size}"
        " --out {output.table} > {log} 2>&1"
