rule figures:
    input:
        similarity=rules.similarity.output.table,
        sensitivity=rules.sensitivity.output.table,
        search=rules.search.output.table,
        selected=rules.select.output,
    output:
        [
            report(
                f"{RESULTS}/figures/{name}.png",
                caption=f"../report/{name}.rst",
                category="Layers and plans",
                subcategory="{model}",
            )
            for name in FIGURES
        ],
        [f"{RESULTS}/figures/{name}.pdf" for name in FIGURES],
    log:
        log_path("figures"),
    threads: 1
    params:
        out_dir=f"{RESULTS}/figures",
    shell:
        "cqil figures --similarity {input.similarity} --sensitivity {input.sensitivity} --search {input.search}"
        " --selected {input.selected} --title {wildcards.model} --out-dir {params.out_dir} > {log} 2>&1"


# The paper's tables for the whole run: quality (with the official numbers where published) and latency.
rule tables:
    input:
        quality=expand(f"{RESULTS}/quality.csv", model=config["models"]),
        latency=expand(f"{RESULTS}/latency.csv", model=LATENCY_MODELS),
        predictions=f"{SIMULATION}/predictions.csv",
    output:
        [
            report(f"{TABLES}/{name}.csv", caption=f"../report/{name}_table.rst", category="Tables")
            for name in ("quality", "latency")
        ],
        [f"{TABLES}/{name}.{kind}" for name in ("quality", "latency") for kind in ("md", "tex")],
    log:
        log_path("tables", job=None),
    threads: 1
    params:
        quality=" ".join(f"{model}=results/{config['run']}/{model}/quality.csv" for model in config["models"]),
        out_dir=output_dir,
    shell:
        "cqil tables --quality {params.quality} --latency {input.latency} --predictions {input.predictions}"
        " --out-dir {params.out_dir} > {log} 2>&1"
