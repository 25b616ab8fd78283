#!/usr/bin/env bash
# Every GPU check in one call, for a machine with one NVIDIA GPU (H100/H200), from the repository root:
#   bash scripts/gpu_checks.sh            # writes under $OUT (the device tool's folder) or results/gpu/
# One decoder layer of LLaMA-7B/13B/33B shapes, random bf16 weights: prefill (128/512/2048 tokens) and a
# decode step over a 2048-token static KV cache, eager and replayed as a CUDA graph. These per-layer
# times are what the simulator (issue 6) scales to multi-GPU predictions. The GPU image has torch and
# transformers; `python3 -m cqil` runs from the checkout without installing it.
set -euo pipefail
out="${OUT:-results/gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.csv"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m cqil layer-latency --shapes llama-7b llama-13b llama-33b --lengths 128 512 2048 --context 2048 \
    --dtype bfloat16 --device cuda --modes eager graphs --out "$out/layers.json" | tee "$out/layers.md"
