# The analytic latency model: the paper's models on GPUs we do not have, validated on this machine's runs.
# Where scripts/gpu_checks.sh has run (its records committed under results/gpu/), a preset fitted to that GPU
# joins the predictions and every preset is checked against its per-layer times.
GPU_LATENCY = [path for path in ["results/gpu/original.json"] if Path(path).exists()]
GPU_LAYERS = [path for path in ["results/gpu/layers.json"] if Path(path).exists()]
GPU_DECODE = [path for path in ["results/gpu/decode.json"] if Path(path).exists()]


rule simulate:
    input:
        latency=[path for model in LATENCY_MODELS for path in latency_files(model)],
        gpu_latency=GPU_LATENCY,
        gpu_layers=GPU_LAYERS,
        gpu_decode=GPU_DECODE,
    output:
        multiext(f"{SIMULATION}/predictions", ".csv", ".md"),
        multiext(f"{SIMULATION}/validation", ".csv", ".md"),
        multiext(f"{SIMULATION}/crossover", ".csv", ".md"),
        multiext(f"{SIMULATION}/gpu_presets", ".csv", ".md") if GPU_LAYERS else [],
        f"{SIMULATION}/simulation.json",
        [
            report(f"{SIMULATION}/{name}.png", caption=f"../report/{name}.rst", category="Latency")
            for name in SIMULATION_FIGURES
        ],
        [f"{SIMULATION}/{name}.pdf" for name in SIMULATION_FIGURES],
    log:
        log_path("simulate", job=None),
    threads: 1
    params:
        settings=settings("simulate"),
        out_dir=output_dir,
    shell:
        "cqil simulate --settings {params.settings} --latency {input.latency} --gpu-latency {input.gpu_latency}"
        " --gpu-layers {input.gpu_layers} --gpu-decode {input.gpu_decode} --out-dir {params.out_dir} > {log} 2>&1"
