#!/usr/bin/env bash
# Every GPU check in one command, for a machine with one NVIDIA GPU (H100/H200), from the repository root:
#   bash scripts/gpu_checks.sh             # on the GPU: records under $OUT (the device tool's folder) or results/gpu/
#   bash scripts/gpu_checks.sh --dry-run   # the same steps on CPU with tiny shapes (tests/test_gpu.py runs this)
# Within about 9.5 minutes on an H200. Cheap, fundamental checks first, slow compiles last; each step has its
# own time limit, a failed or cut step is logged and the next one runs, and every record is written as its
# step goes (at most 8 files, as the device tool brings back):
#   env.json       versions, the GPU's name, clocks, power limit, driver, CUDA and NCCL versions; a one-rank NCCL
#                  group and its collectives; TP of degree 1 through DTensor against the plain model (logits),
#                  and what DTensor's dispatch costs per decoded token (random LLaMA-7B, eager, then compiled)
#   engines.json   the cqil (D0, D1) and tp engines on 2 ranks sharing the GPU (gloo with CUDA tensors) at
#                  LLaMA-7B width in bf16: each check against the single-process reference, its limit and margin
#   stages.json    the default DAG's stages on the GPU with small settings (random weights, SmolLM2's tokenizer):
#                  each stage's peak GPU memory, the proof that it ran there
#   finetune.json  LoRA + KD micro-steps at the LLaMA-33B shape (plan S18-E58-P4-D0, 2048 tokens, bf16), without
#                  and with gradient checkpointing: peak GPU memory, seconds per micro-batch, the adapter's bytes
#   original.json  `cqil latency` of a random LLaMA-7B: per-layer and non-layer times (`cqil simulate
#                  --gpu-latency` fits the measured preset to them)
#   decode.json    end-to-end greedy decode of that model: eager, static cache, compiled (CUDA graphs), in ms/token
#                  against the bandwidth floor
#   layers.json    one decoder layer of LLaMA-7B/13B/33B shapes, eager and as a CUDA graph, prefill and decode
#   log.txt        every step's output and exit status (the script's status is 1 if any step failed)
# Then, here: copy the records to results/gpu/ and `snakemake --cores all` (the simulate rule reads them).
# The GPU machine's image is not the lock and has no Hub: the code runs from the checkout (installed if pip can
# do it offline), the stages' model is random weights under a tokenizer carried in $CQIL_GPU_TOKENIZER.
set -uo pipefail # no -e: a failed step is a finding, and the next step still runs
dry=false
[[ "${1:-}" == "--dry-run" ]] && dry=true
out="${OUT:-results/gpu}"
work="$(mktemp -d)"
mkdir -p "$out"
log="$out/log.txt"
: >"$log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
steps=(python3 scripts/gpu_steps.py)
cqil=(python3 -m cqil)

step() { # step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds, log it, go on whatever it did
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s) $(date +%T)" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local status=$?
    echo "== $name: exit $status$([[ $status == 124 ]] && echo ' (time limit)')" | tee -a "$log"
}

if $dry; then # tiny shapes on CPU: every step, command and record format
    device=cpu dtype=float32 big=random:llama-135m shapes=(llama-135m) lengths=(16 32) context=32
    layer_modes=(eager) layer_repeats=(--warmup 1 --repeats 2) engine_plans=(S12-E28-P2-D0 S12-E28-P2-D1)
    decode=(--prompt-length 16 --new-tokens 4 --repeats 1) backend=eager
    timing='{"prompt_lengths": [16, 32], "new_tokens": 2, "warmup": 0, "repeats": 1, "baseline_threads": [1]}'
    finetune=(--shape llama-135m --plan S12-E28-P2-D0 --tokens 32 --device cpu --dtype float32 --steps 1)
    collectives=(--prompt-length 8 --new-tokens 2 --repeats 1)
    tokenizer=$(python3 -c "from cqil.models import prepare_embedded; print(prepare_embedded('smollm2-135m'))")
    tiny=(--tiny)
else
    device=cuda dtype=bfloat16 big=random:llama-7b shapes=(llama-7b llama-13b llama-33b) lengths=(128 2048)
    context=2048 layer_modes=(eager graphs) layer_repeats=(--warmup 3 --repeats 10)
    engine_plans=(S12-E30-P2-D0 S12-E30-P2-D1) backend=inductor
    decode=(--prompt-length 128 --new-tokens 32 --repeats 3)
    timing='{"prompt_lengths": [128, 2048], "new_tokens": 32, "warmup": 1, "repeats": 3, "baseline_threads": [1]}'
    finetune=(--shape llama-33b --plan S18-E58-P4-D0 --tokens 2048)
    tokenizer="${CQIL_GPU_TOKENIZER:-.gpu/tokenizer}" tiny=() collectives=()
    nvidia-smi | tee -a "$log"
    # The checkout as a package where pip can do it offline (provenance records its version); else from PYTHONPATH
    step install 60 python3 -m pip install --quiet --no-deps --no-build-isolation --no-index -e .
fi
check='{"prompt_lengths": [16], "new_tokens": 2, "warmup": 0, "repeats": 1, "baseline_threads": [1],
        "allreduce_tokens": [1], "allreduce_repeats": 2, "interleaved_baseline": false, "share_gpu": true}'
torchrun=(python3 -m torch.distributed.run --standalone --nproc_per_node 1)

step env 60 "${steps[@]}" env --out "$out/env.json"
step collectives 90 "${torchrun[@]}" scripts/gpu_steps.py collectives --out "$out/env.json" --big "$big" \
    --dtype "$dtype" --modes eager --backend "$backend" "${collectives[@]}"
# The engines' checks run beside the stages: both are correctness, neither a timing that is published.
(
    for plan in "${engine_plans[@]}"; do
        step "cqil $plan" 90 "${cqil[@]}" latency --model "$big" --engine cqil --plan "$plan" --dtype "$dtype" \
            --device "$device" --settings "$check" --out "$work/cqil-$plan.json"
    done
    step "tp 2" 90 "${cqil[@]}" latency --model "$big" --engine tp --degree 2 --dtype "$dtype" --device "$device" \
        --settings "$check" --out "$work/tp-2.json"
    step checks 30 "${steps[@]}" checks --out "$out/engines.json" "$work"/cqil-*.json "$work/tp-2.json"
) &
engines=$!
step model 60 "${steps[@]}" model --tokenizer "$tokenizer" "${tiny[@]}" --out "$work/model"
step stages 150 "${steps[@]}" stages --model "$work/model" --work "$work/stages" --device "$device" "${tiny[@]}" \
    --out "$out/stages.json"
wait $engines
step original 90 "${cqil[@]}" latency --model "$big" --engine original --dtype "$dtype" --device "$device" \
    --settings "$timing" --out "$out/original.json"
step layers 90 "${cqil[@]}" layer-latency --shapes "${shapes[@]}" --lengths "${lengths[@]}" --context "$context" \
    --dtype "$dtype" --device "$device" --modes "${layer_modes[@]}" "${layer_repeats[@]}" --out "$out/layers.json"
step "finetune" 100 "${steps[@]}" finetune "${finetune[@]}" --out "$out/finetune.json"
step "finetune checkpointing" 100 "${steps[@]}" finetune "${finetune[@]}" --checkpointing --out "$out/finetune.json"
step decode 150 "${cqil[@]}" decode-latency --model "$big" --dtype "$dtype" --device "$device" "${decode[@]}" \
    --backend "$backend" --out "$out/decode.json"
step "collectives compiled" 150 "${torchrun[@]}" scripts/gpu_steps.py collectives --out "$out/env.json" \
    --big "$big" --dtype "$dtype" --modes compiled --backend "$backend" --skip-checks "${collectives[@]}"
if $dry; then # the simulator reads the records as it will read the GPU's
    step simulate 120 "${cqil[@]}" simulate --gpu-latency "$out/original.json" --gpu-layers "$out/layers.json" \
        --gpu-decode "$out/decode.json" --out-dir "$work/simulation"
    cp -r "$work/simulation" "$out/simulation"
fi
grep '^== ' "$log"
! grep -q ': exit [1-9]' "$log" # the status: every step passed
