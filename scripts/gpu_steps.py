"""The GPU script's own checks (scripts/gpu_checks.sh runs them; `--dry-run` there runs them on CPU, tiny):

    python3 scripts/gpu_steps.py env --out env.json                  # versions, the GPU's state
    torchrun --standalone --nproc_per_node 1 scripts/gpu_steps.py collectives --out env.json
    python3 scripts/gpu_steps.py checks --out engines.json cqil.json tp.json ...   # the engines' check margins
    python3 scripts/gpu_steps.py model --tokenizer DIR --out DIR     # random weights, a real tokenizer
    python3 scripts/gpu_steps.py stages --model DIR --work DIR --out stages.json
    python3 scripts/gpu_steps.py finetune --shape llama-33b --tokens 2048 --out finetune.json

Every step adds its findings to its JSON file as it goes (atomically), so a step cut short by its
timeout keeps what it measured. What each proves is said in scripts/gpu_checks.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout, installed or not

from cqil.io import provenance, write_json  # noqa: E402


def add(path, key: str, value) -> None:
    """Set `key` of the JSON record `path` (created if absent), atomically."""
    record = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    write_json(path, record | {key: value})


def attempt(path, key: str, work) -> None:
    """Record `work()`'s result under `key`, or the error it raised: a failed check does not stop the next."""
    start = time.perf_counter()
    try:
        found = {"ok": True, **work()}
    except Exception as err:  # noqa: BLE001 - every failure is a finding to record
        found = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    add(path, key, found | {"seconds": round(time.perf_counter() - start, 2)})
    print(f"{key}: {'ok' if found['ok'] else found['error']}", flush=True)


def peak_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None


# --- env: versions and the GPU's state -------------------------------------------------------------------


def step_env(args) -> None:
    import transformers

    from cqil.latency.gpu import gpu_state

    cuda = torch.cuda.is_available()
    add(
        args.out,
        "env",
        {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "bf16": cuda and torch.cuda.is_bf16_supported(),
            "state": gpu_state(),
            "provenance": provenance({"step": "env"}),
        },
    )


# --- collectives: a one-rank NCCL group, DTensor on it ------------------------------------------------


def step_collectives(args) -> None:
    """Under torchrun, one rank: NCCL's collectives on CUDA tensors (gloo on CPU), TP of degree 1 through DTensor
    against the plain model (its logits and its per-token cost: DTensor's dispatch, nothing split)."""
    import torch.distributed as dist

    from cqil import runtime
    from cqil.decode import Decoder
    from cqil.latency.check import compare, reference_run
    from cqil.latency.gpu import decode_ms
    from cqil.latency.settings import LatencySettings
    from cqil.models import load_model
    from cqil.runtime import tp

    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)  # as runtime.init does for one GPU per rank
    else:
        dist.init_process_group("gloo")

    def collectives():
        found = {"backend": dist.get_backend(), "world": dist.get_world_size()}
        dist.barrier()
        for dtype in (torch.bfloat16, torch.float64):
            x = torch.arange(8, dtype=dtype, device=device)
            dist.all_reduce(x)
            dist.broadcast(x, src=0)
            gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, x)
            expected = torch.arange(8, dtype=dtype, device=device) * dist.get_world_size()
            found[str(dtype).removeprefix("torch.")] = bool(torch.equal(gathered[0], expected))
        return found

    def tp_check():  # float32, the check's own tolerance: degree 1 must equal the plain model
        model, _ = load_model(args.small, dtype="float32", device=device)
        reference = reference_run(model, LatencySettings(), device)
        return compare(Decoder(tp.shard(model, 1, device.type)), reference)

    if not args.skip_checks:
        attempt(args.out, "collectives", collectives)
        attempt(args.out, "tp1_check", tp_check)
    key = f"dtensor_cost_{'_'.join(args.modes)}"

    def dtensor_cost():  # ms/token of the plain model, then of the same weights under DTensor, in each mode
        model, _ = load_model(args.big, dtype=args.dtype, device=device)
        prompt = torch.randint(model.config.vocab_size, (1, args.prompt_length), device=device)
        found = {"model": args.big, "dtype": args.dtype, "prompt_length": args.prompt_length}
        for engine in ("plain", "tp1"):
            if engine == "tp1":
                model = tp.shard(model, 1, device.type)
            for mode in args.modes:
                timing = decode_ms(Decoder(model, mode, args.backend), prompt, args.new_tokens, args.repeats)
                found[f"{engine}_{mode}"] = timing
                add(args.out, key, {"ok": False, "cut_short": True, **found})  # kept if a timeout cuts the rest
                torch._dynamo.reset()
        return found

    attempt(args.out, key, dtensor_cost)
    runtime.Ranks(0, 1, device).close()
    dist.destroy_process_group()


# --- checks: the engines' checks and their margins ---------------------------------------------------


def step_checks(args) -> None:
    """The check block of each `cqil latency` result (2 ranks sharing the GPU), with its limit and margin."""
    from cqil.latency.check import check_limit

    found = {}
    for path in args.results:
        if not Path(path).exists():
            found[Path(path).stem] = {"ok": False, "error": "no result (the run failed: see log.txt)"}
            continue
        result = json.loads(Path(path).read_text())
        check, limit = result["check"], check_limit(result["check"], result["dtype"])
        found[Path(path).stem] = {
            "engine": result["engine"],
            "plan": result["plan"],
            "degree": result["degree"],
            "model": result["model"],
            "dtype": result["dtype"],
            "backend": result["backend"],
            "shared_gpu": result.get("shared_gpu"),
            "mode": result.get("mode"),
            **check,
            "limit": limit,
            "margin": check["max_abs_diff"] / limit,  # < 1 passes
        }
    write_json(args.out, found)


# --- model: random weights under a real tokenizer -------------------------------------------------------


def step_model(args) -> None:
    """A model directory with the config and tokenizer of `--tokenizer` and seeded random weights: every stage's
    path (tokenizing real text included) without weights that cannot travel to the GPU machine."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.tokenizer)
    if args.tiny:  # the dry run: the same layers and vocabulary, narrow
        config.update(dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2))
        config.head_dim = 16
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(args.out)


# --- stages: the default DAG's stages on the device, small settings ----------------------------------


def stage_commands(model: str, work: Path, device: str, tiny: bool) -> list[tuple[str, list[str]]]:
    """(stage, `cqil` arguments) of the default DAG's stages with small settings (`tiny`: smaller), in order."""
    corpus, plan = str(work / "corpus.pt"), "S16-E28-P2-D0"
    sizes = (2, 2, 4, 2) if tiny else (4, 4, 16, 4)
    blocks = dict(zip(("calibration", "search", "finetune", "test"), sizes))
    text = str(ROOT / "data/wikitext-2/wiki.valid.tokens")
    settings = {
        "corpus": {"block_size": 32 if tiny else 128, "blocks": blocks, "files": [text]},
        "sensitivity": {"distances": [1]},
        "search": {"starts": [16], "ends": [28], "sizes": [2], "bypasses": [0], "include": [], "batch_size": 4},
        "finetune": {"steps": 1 if tiny else 4, "batch_size": 2},
        "latency": {"prompt_lengths": [16 if tiny else 64], "new_tokens": 4, "warmup": 0, "baseline_threads": [1]},
    }
    files = {
        "corpus": ["--out", corpus, "--summary", str(work / "corpus.json")],
        "finetune": ["--plan", plan, "--corpus", corpus, "--out-dir", str(work / "finetune")]
        + ["--summary", str(work / "finetune.json")],
        "score": ["--plan", plan, "--corpus", corpus, "--out", str(work / "score.json")],
        "latency": ["--engine", "original", "--out", str(work / "latency.json")],
    }
    return [
        (
            stage,
            [stage, "--settings", json.dumps(settings.get(stage, {})), "--model", model, "--device", device]
            + files.get(stage, ["--corpus", corpus, "--out", str(work / f"{stage}.csv")]),
        )
        for stage in ("corpus", "similarity", "sensitivity", "search", "score", "finetune", "latency")
    ]


def step_stages(args) -> None:
    """Each stage in this process through `cqil.cli.main`, with the peak GPU memory it allocated: a stage whose peak
    is about the model's weights or more ran on the GPU."""
    from cqil.cli import main

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for stage, argv in stage_commands(args.model, work, args.device, args.tiny):

        def run(stage=stage, argv=argv):
            peak_reset(args.device)
            try:
                main(argv)
            except SystemExit as err:  # cqil's one-line errors end in exit status 2
                if err.code:
                    raise RuntimeError(f"cqil {stage} exited with status {err.code}") from None
            return {"device": args.device, "peak_gpu_bytes": peak_bytes(args.device)}

        attempt(args.out, stage, run)


# --- finetune: one LoRA + KD micro-step at a big shape -------------------------------------------------


def step_finetune(args) -> None:
    """Micro-steps of LoRA + KD (the paper config's fine-tuning settings) on one (1, T) random block of a random-weight
    model of `--shape` with `--plan`: peak GPU memory, seconds per micro-batch, the adapter's bytes."""
    import yaml
    from accelerate import Accelerator
    from peft import get_peft_model

    from cqil.finetune import FinetuneSettings, checkpoint_layers, lora_config, student_loss
    from cqil.layers import decoder_layers
    from cqil.models import load_model
    from cqil.plan import Plan
    from cqil.transform import apply_plan

    paper = yaml.safe_load((ROOT / "config/paper.yaml").read_text()).get("finetune", {})
    known = set(FinetuneSettings.__dataclass_fields__)
    settings = FinetuneSettings(**{k: v for k, v in paper.items() if k in known})
    key = f"{args.shape}_{'checkpointing' if args.checkpointing else 'plain'}"

    def micro_steps():
        peak_reset(args.device)
        model, _ = load_model(f"random:{args.shape}", dtype=args.dtype, device=args.device)
        weights = peak_bytes(args.device)
        plan = Plan.parse(args.plan)
        apply_plan(model, plan)
        student = get_peft_model(model, lora_config(plan, len(decoder_layers(model)), settings))
        if args.checkpointing:  # as the fine-tuning stage does it
            checkpoint_layers(model)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=settings.lr)
        accelerator = Accelerator(mixed_precision="bf16" if args.device == "cuda" else "no", cpu=args.device == "cpu")
        wrapped, optimizer = accelerator.prepare(student, optimizer)
        ids = torch.randint(model.config.vocab_size, (1, args.tokens), device=accelerator.device)
        seconds = []
        for _ in range(args.steps):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            accelerator.backward(student_loss(student, ids, settings, forward=wrapped))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        adapter = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
        return {
            "shape": args.shape,
            "plan": args.plan,
            "tokens": args.tokens,
            "dtype": args.dtype,
            "gradient_checkpointing": args.checkpointing,
            "loss": settings.loss,
            "lora_r": settings.lora_r,
            "weights_bytes_on_gpu": weights,
            "peak_gpu_bytes": peak_bytes(args.device),
            "adapter_bytes": adapter,
            "seconds_per_micro_batch": seconds,
        }

    attempt(args.out, key, micro_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    for name in ("env", "collectives", "checks", "model", "stages", "finetune"):
        step = sub.add_parser(name)
        step.add_argument("--out", required=True)
        step.set_defaults(run=globals()[f"step_{name}"])
    collectives = sub.choices["collectives"]
    collectives.add_argument("--small", default="random:llama-135m")
    collectives.add_argument("--big", default="random:llama-7b")
    collectives.add_argument("--dtype", default="bfloat16")
    collectives.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    collectives.add_argument("--backend", default="inductor")
    collectives.add_argument("--prompt-length", type=int, default=128)
    collectives.add_argument("--new-tokens", type=int, default=32)
    collectives.add_argument("--repeats", type=int, default=3)
    collectives.add_argument("--skip-checks", action="store_true", help="only the DTensor cost (a second pass)")
    sub.choices["checks"].add_argument("results", nargs="+")
    sub.choices["model"].add_argument("--tokenizer", required=True)
    sub.choices["model"].add_argument("--tiny", action="store_true", help="narrow layers (the dry run)")
    stages = sub.choices["stages"]
    stages.add_argument("--model", required=True)
    stages.add_argument("--work", required=True)
    stages.add_argument("--device", default="cuda")
    stages.add_argument("--tiny", action="store_true", help="fewer and shorter blocks (the dry run)")
    finetune = sub.choices["finetune"]
    finetune.add_argument("--shape", default="llama-33b")
    finetune.add_argument("--plan", default="S18-E58-P4-D0")
    finetune.add_argument("--tokens", type=int, default=2048)
    finetune.add_argument("--dtype", default="bfloat16")
    finetune.add_argument("--device", default="cuda")
    finetune.add_argument("--steps", type=int, default=3)
    finetune.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
