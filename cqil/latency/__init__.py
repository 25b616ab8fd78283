"""Latency: time an engine on its ranks, read the results into a table, and the GPU's own benchmarks.

    cqil latency --model smollm2-135m --engine cqil --plan S12-E28-P2-D0 --out cqil.json
    cqil latency-table cqil.json original.json --out latency.csv --figure latency

- `settings.py`: what one run is asked to time, checked whole before any process starts (`LatencySettings`,
  the config section `latency`; `Job`: the model, the engine and its plan or degree against the model's config);
- `engine.py`: the stage `cqil latency`: each rank builds its part of the engine, checks its logits against a
  single-process reference (`check.py`) and times it (`timing.py`); rank 0 writes the result;
- `contention.py`: was the machine busy while we timed? (a result measured on a busy machine is flagged);
- `table.py`: the stage `cqil latency-table`: results -> one table with reductions (pandas; no torch);
- `gpu.py`: what only a GPU shows: end-to-end decode against the bandwidth floor, one decoder layer eager and as
  a CUDA graph (the GPU script, scripts/gpu_checks.sh).

The engines themselves (CQIL on P ranks, tensor parallelism) are in cqil/runtime/; the simulator that scales these
measurements to the paper's GPUs is cqil/simulate/. Contention sits here, not in cqil/tracking/: it is part of
taking a measurement, and tracking only reads the flag a result carries, so the packages import downwards
(tracking -> latency).
"""
