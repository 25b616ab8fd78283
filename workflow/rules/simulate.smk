# The analytic latency model: the paper's models on GPUs we do not have, validated on this machine's runs.
rule simulate:
    input:
        [path for model in LATENCY_MODELS for path in latency_files(model)],
    output:
        multiext(f"{SIMULATION}/predictions", ".csv", ".md"),
        multiext(f"{SIMULATION}/validation", ".csv", ".md"),
        multiext(f"{SIMULATION}/crossover", ".csv", ".md"),
        f"{SIMULATION}/simulation.json",
        [
            report(f"{SIMULATION}/{name}.png", caption=f"../report/{name}.rst", category="Latency")
            for name in SIMULATION_FIGURES
        ],
        [f"{SIMULATION}/{name}.pdf" for name in SIMULATION_FIGURES],
    log:
        f"logs/{config['run']}/simulate.log",
    threads: 1
    params:
        settings=settings("simulate"),
        out_dir=output_dir,
    shell:
        "cqil simulate --settings {params.settings} --latency {input} --out-dir {params.out_dir} > {log} 2>&1"
