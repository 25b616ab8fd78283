#!/usr/bin/env bash
# Every GPU check in one call, for a machine with one NVIDIA GPU (H100/H200), from the repository root:
#   bash scripts/gpu_checks.sh             # on the GPU: records under $OUT (the device tool's folder) or results/gpu/
#   bash scripts/gpu_checks.sh --dry-run   # the same commands on CPU with tiny shapes (the test suite runs this)
# Within about 8 minutes on an H200:
#   layers.json      one decoder layer of LLaMA-7B/13B/33B shapes, random bf16 weights: prefill of 128/512/2048
#                    tokens and a decode step over a 2048-token static cache, eager and as a CUDA graph
#   decode.json      end-to-end greedy decode of a random LLaMA-7B: eager, static cache, static cache compiled
#                    (CUDA graphs), in ms/token against the bandwidth floor; nvidia-smi state, CUDA and NCCL versions
#   original.json    `cqil latency` of that model on the GPU: per-layer and non-layer times, which `cqil simulate
#                    --gpu-latency` fits a preset to
#   cqil-2ranks.json the cqil engine on 2 ranks sharing the GPU (gloo with CUDA tensors), its logits checked
#                    against the single-process simulation: the CUDA path's correctness, not a timing; a failing
#                    check fails the script
# Then, here: copy the records to results/gpu/ and `snakemake --cores all` (the simulate rule reads them).
# The GPU image has torch and transformers; `python3 -m cqil` runs from the checkout without installing it.
set -euo pipefail
dry=false
[[ "${1:-}" == "--dry-run" ]] && dry=true
out="${OUT:-results/gpu}"
mkdir -p "$out"
cqil() { python3 -m cqil "$@"; }
if $dry; then  # tiny shapes on CPU: every command and file format, in about a minute
    device=cpu dtype=float32 big=random:llama-135m shapes=(llama-135m) lengths=(16 32) context=32 modes=(eager)
    decode=(--prompt-length 16 --new-tokens 4 --backend eager --repeats 1)
    timing='{"prompt_lengths": [16, 32], "new_tokens": 2, "warmup": 0, "repeats": 1, "baseline_threads": [1]}'
    repeats=(--warmup 1 --repeats 2)
else
    device=cuda dtype=bfloat16 big=random:llama-7b shapes=(llama-7b llama-13b llama-33b) lengths=(128 512 2048)
    context=2048 modes=(eager graphs) decode=(--prompt-length 128 --new-tokens 64 --repeats 5) repeats=()
    timing='{"prompt_lengths": [128, 512, 2048], "new_tokens": 32, "warmup": 2, "repeats": 5, "baseline_threads": [1]}'
    nvidia-smi
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
cqil layer-latency --shapes "${shapes[@]}" --lengths "${lengths[@]}" --context "$context" --dtype "$dtype" \
    --device "$device" --modes "${modes[@]}" "${repeats[@]}" --out "$out/layers.json" | tee "$out/layers.md"
cqil decode-latency --model "$big" --dtype "$dtype" --device "$device" "${decode[@]}" --out "$out/decode.json"
cqil latency --model "$big" --engine original --dtype "$dtype" --device "$device" --settings "$timing" \
    --out "$out/original.json"
check='{"prompt_lengths": [16], "new_tokens": 2, "warmup": 0, "repeats": 1, "allreduce_tokens": [1], "allreduce_repeats": 2}'
cqil latency --model random:llama-135m --engine cqil --plan S12-E28-P2-D0 --dtype float32 --device "$device" \
    --settings "$check" --out "$out/cqil-2ranks.json"
python3 - "$out/cqil-2ranks.json" <<'EOF'
import json, sys
check = json.load(open(sys.argv[1]))["check"]
print(f"cqil on 2 ranks ({sys.argv[1]}): max |logit difference| {check['max_abs_diff']:.3g}, "
      f"argmax agreement {check['argmax_agreement']:.0%} against the single-process simulation")
EOF
if $dry; then  # the simulator reads the records as it will read the GPU's
    cqil simulate --gpu-latency "$out/original.json" --gpu-layers "$out/layers.json" --out-dir "$out/simulation"
fi
