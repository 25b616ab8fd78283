rule similarity:
    input:
        rules.corpus.output.blocks,
    output:
        f"{RESULTS}/similarity.csv",
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
        mem_mb=res("similarity", "mem_mb"),
        runtime=res("similarity", "runtime"),
        gpu=res("similarity", "gpu"),
    shell:
        "cqil --threads {threads} similarity --model {params.spec} --dtype {params.dtype} --corpus {input}"
        " --split {params.split} --batch-size {params.batch_size} --out {output} > {log} 2>&1"
