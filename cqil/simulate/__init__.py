"""The simulator: latency of the original model, CQIL, TP and CQIL x TP on hardware we do not have.

    cqil simulate --latency results/default/*/latency/*.json --out-dir results/default/simulation

- `model.py`: the analytic model (hardware presets, a layer's time, an all-reduce's, the rest of a forward);
- `fit.py`: its parameters from measurements (this machine's `cqil latency` runs, a GPU's records) and the
  validation: every measured latency predicted from a fit to the original's alone;
- `predict.py`: the stage `cqil simulate`: predictions for the paper's models on each preset, the CQIL/TP
  crossover, the validation, tables and figures.
"""
