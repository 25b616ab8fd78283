"""What each job of a run needs in memory, from the config alone: checked before any job runs.

    check_memory(config)                          # raises ConfigError, one line naming the rule, model and fix
    need = job_memory("finetune", "llama-33b", config)   # Memory(host=..., gpu=..., ranks=4), in bytes

cqil/cost.py counts GPU-hours from the same shapes (`cqil cost`).

A model's shape comes from its config without reading a weight: its parameters are counted on the meta
device, once per process. The config is the catalog entry's `shape` (a cqil.models.SHAPES name), a
`random:` spec's, or the model's own where it is on this machine without a download (a local directory or
GGUF file, a prepared embedded model, a Hub id in the Hugging Face cache). A model with none of these (a
Hub id before its first download, without `shape`) is left out of the check; `cqil cost` refuses it.

Each estimate is a sum of terms, one small function each, with the bytes it counts and where they come
from. A job's host memory is held against `resources.<rule>.mem_mb` and its per-GPU memory against
`resources.<rule>.gpu_mem_mb` (MiB, as mem_mb; no check where the config does not state it). docs/cost.md
has the estimates of the paper run and the measurements behind the constants.
"""

from __future__ import annotations

import functools
import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .baselines import BaselinesSettings
from .data import token_dtype
from .errors import ConfigError, ModelError
from .layers import decoder_layers
from .models import EMBEDDED, RANDOM, load_config, random_config, resources_dir
from .plan import Plan, Setup
from .stages import SECTIONS

GIB, MIB = 2**30, 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# Host memory of one process beyond what it computes on: Python with torch, transformers, peft and lm-eval
# imported, and the allocator's headroom (measured: docs/cost.md).
PROCESS_BYTES = 1 * GIB
# ... and of one process that holds a GPU: the CUDA runtime and its libraries (cuBLAS, cuDNN, NCCL) in host memory.
CUDA_HOST_BYTES = 2 * GIB
# GPU memory outside PyTorch's tensors: the CUDA context, cuBLAS workspaces, the caching allocator's rounding.
CUDA_DEVICE_BYTES = 2 * GIB
# Assumption: a GPU job loads its weights straight onto its GPU (load_model(device=...); safetensors are read
# memory-mapped, a tensor at a time), so its host memory is its processes' runtimes and the corpus it reads,
# never a host copy of the model. A job without a GPU computes in host memory: there it counts everything.

# Fine-tuning keeps, per token and decoder layer, what autograd saves for the backward of a LoRA model (every
# projection adapted) under bf16 autocast, in 2-byte activations: the MLP's gate, up, SiLU and product (8 i);
# both RMSNorms' float32 input and bf16 output, q before and after RoPE, the attention output and o_proj's
# input (25 h); k and v (4 kv). tests/test_memory.py counts the saved tensors of a real step against it.
ACTIVATION_COEFFICIENTS = {"intermediate": 8, "hidden": 25, "kv": 4}
# LoRA parameters in float32 (peft keeps adapters in float32 beside bf16 weights), their gradient, AdamW's two
# moments, and DDP's gradient bucket: 4 + 4 + 8 + 4 bytes each.
LORA_BYTES_PER_PARAMETER = 20
# The KD loss per logit (B, T, V): student and teacher logits (bf16, 2 + 2), their float32 log-softmax (4 + 4),
# kl_div's float32 temporaries (8) and the gradient of the student's log-softmax in the backward (4).
KD_BYTES_PER_LOGIT = 24
# Inference stages per logit: the original's float32 log-probs (kept for every variant), a variant's logits
# (the model's dtype), their float32 log-probs and kl_div's float32 temporary.
SCORE_BYTES_PER_LOGIT = 12
# evaluate (lm-eval) pads a batch to its longest request: assumed at most 512 tokens (a multiple-choice question
# with its context; lm-eval runs the longest batch first, so a task with longer questions fails at once).
EVAL_TOKENS = 512


@dataclass(frozen=True)
class Shape:
    """What the estimates need of a model: counted on the meta device."""

    parameters: int  # every parameter (embeddings, layers, head)
    layer_parameters: int  # of one decoder layer
    layers: int
    hidden: int
    intermediate: int
    kv: int  # key/value width: kv heads x head dim
    vocab: int
    dtype_bytes: int  # bytes per weight as the stages load it


@dataclass(frozen=True)
class Memory:
    host: int  # bytes of the whole job in host memory (all its processes)
    gpu: int  # bytes on each of its GPUs (0: the job holds none)
    ranks: int  # processes


# --- the model's shape -------------------------------------------------------------------------------------------


def _local_config(spec: str, shape: str | None):
    """A model's transformers config without a download: `shape`, a random: spec, or the model's own files."""
    if shape or spec.startswith(RANDOM):
        return random_config(RANDOM + shape if shape else spec)
    if spec in EMBEDDED:
        prepared = resources_dir() / "models" / spec
        return AutoConfig.from_pretrained(prepared) if (prepared / "config.json").is_file() else None
    if Path(spec).is_dir() or Path(spec).suffix == ".gguf":
        return load_config(spec)
    try:  # a Hub id: its config.json in the Hugging Face cache, if a run or `cqil info` read it before
        return AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        return None


@functools.cache
def model_shape(spec: str, shape: str | None = None, dtype: str = "auto") -> Shape | None:
    """The shape of a catalog entry (spec, shape, dtype); None where its config is not on this machine."""
    config = _local_config(spec, shape)
    if config is None:
        return None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if dtype == "auto":  # the checkpoint's own dtype; a random or named shape loads in float32
        dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return Shape(
        parameters=sum(p.numel() for p in skeleton.parameters()),
        layer_parameters=sum(p.numel() for p in decoder_layers(skeleton)[0].parameters()),
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        kv=config.num_key_value_heads * head_dim,
        vocab=config.vocab_size,
        dtype_bytes=DTYPE_BYTES.get(dtype, 4),
    )


def catalog_shape(config: dict, model: str) -> Shape | None:
    entry = config["catalog"][model]
    try:
        return model_shape(entry["spec"], entry.get("shape"), entry.get("dtype", "auto"))
    except ModelError as err:
        field = "shape" if entry.get("shape") else "spec"
        raise ConfigError(f"config.catalog.{model}.{field}: {err}") from None


# --- the terms (bytes) -------------------------------------------------------------------------------------------


def weight_bytes(shape: Shape) -> int:
    return shape.parameters * shape.dtype_bytes


def layer_inputs_bytes(shape: Shape, tokens: int) -> int:
    """The input of every decoder layer, kept for a batch (similarity, sensitivity, search, score)."""
    return shape.layers * tokens * shape.hidden * shape.dtype_bytes


def working_bytes(shape: Shape, tokens: int) -> int:
    """One decoder layer's transient tensors in a forward without autograd: gate, up and their product; q, the
    attention output and o_proj's; k and v."""
    return tokens * (3 * shape.intermediate + 3 * shape.hidden + 2 * shape.kv) * shape.dtype_bytes


def gram_chunk_bytes(shape: Shape, batch: int, block: int) -> int:
    """The similarity's float64 chunk (analysis.cosine_gram): every layer's states at ceil((T-1)/L) positions."""
    return shape.layers * batch * math.ceil((block - 1) / shape.layers) * shape.hidden * 8


def kv_cache_bytes(shape: Shape, tokens: int) -> int:
    """Keys and values of every layer for `tokens` (batch x length) in the model's dtype."""
    return shape.layers * tokens * 2 * shape.kv * shape.dtype_bytes


def activation_bytes_per_token_layer(shape: Shape, act_bytes: int = 2) -> int:
    """What a fine-tuning step keeps per token and decoder layer for the backward (ACTIVATION_COEFFICIENTS),
    scaled from 2-byte activations to `act_bytes`."""
    c = ACTIVATION_COEFFICIENTS
    per = c["intermediate"] * shape.intermediate + c["hidden"] * shape.hidden + c["kv"] * shape.kv
    return per * act_bytes // 2


def train_activation_bytes(shape: Shape, tokens: int, checkpointing: bool, group: int, act_bytes: int = 2) -> int:
    """The backward's activations: every layer's without checkpointing; with it, each layer's input
    (`act_bytes` per hidden unit) plus one recomputed unit, a CQIL group of `group` layers at most."""
    per_layer = activation_bytes_per_token_layer(shape, act_bytes) * tokens
    if not checkpointing:
        return shape.layers * per_layer
    return shape.layers * tokens * shape.hidden * act_bytes + group * per_layer


def lora_parameters(shape: Shape, rank: int, targets: list, layers: int) -> int:
    """r x (in + out) per adapted projection and layer."""
    widths = {  # (in + out) of each projection
        "q_proj": 2 * shape.hidden,
        "k_proj": shape.hidden + shape.kv,
        "v_proj": shape.hidden + shape.kv,
        "o_proj": 2 * shape.hidden,
        "gate_proj": shape.hidden + shape.intermediate,
        "up_proj": shape.hidden + shape.intermediate,
        "down_proj": shape.hidden + shape.intermediate,
    }
    return rank * layers * sum(widths.get(t, 2 * shape.hidden) for t in targets)


def corpus_bytes(config: dict, split: str) -> int:
    """One split as `load_split` gives it to a stage: int64 ids (cqil/data.py), 8 bytes a token."""
    corpus = config["corpus"]
    return corpus["blocks"][split] * corpus["block_size"] * 8


def mapped_split_bytes(shape: Shape, config: dict, split: str) -> int:
    """One split as `open_split` maps it: the corpus file's compact ids (uint16 or int32, cqil/data.py)."""
    corpus = config["corpus"]
    return corpus["blocks"][split] * corpus["block_size"] * token_dtype(shape.vocab).itemsize


# --- per rule: what one rank computes on (its GPU, or host memory), the corpus the job holds, the ranks -------


def section_settings(config: dict, section: str) -> SimpleNamespace:
    """A section's settings as its stage reads them: the config's values over the settings class's defaults.
    Not the class itself: check_settings has built it already, and some classes' checks are slow (lm-eval tasks)."""
    defaults = {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(SECTIONS[section])}
    return SimpleNamespace(**defaults | config.get(section, {}))


def largest_group(config: dict, model: str) -> int:
    """The largest CQIL group a selected plan can have: a checkpointed unit of fine-tuning."""
    named = config["search"].get("include", []) + config["catalog"][model].get("plans", [])
    return max([*config["search"]["sizes"], *(Plan.parse(p).size for p in named)])


def _scoring(shape: Shape, config: dict, section: str) -> int:
    tokens = section_settings(config, section).batch_size * config["corpus"]["block_size"]
    logits = tokens * shape.vocab * (SCORE_BYTES_PER_LOGIT + shape.dtype_bytes)
    return weight_bytes(shape) + layer_inputs_bytes(shape, tokens) + logits + working_bytes(shape, tokens)


def similarity_need(shape: Shape, config: dict, model: str):
    batch, block = section_settings(config, "similarity").batch_size, config["corpus"]["block_size"]
    tokens = batch * block
    chunk = gram_chunk_bytes(shape, batch, block)
    compute = weight_bytes(shape) + layer_inputs_bytes(shape, tokens) + chunk + working_bytes(shape, tokens)
    return compute, corpus_bytes(config, section_settings(config, "similarity").split), 1


def scoring_need(section: str):
    def need(shape: Shape, config: dict, model: str):
        return _scoring(shape, config, section), corpus_bytes(config, section_settings(config, section).split), 1

    return need


def finetune_need(shape: Shape, config: dict, model: str):
    s = section_settings(config, "finetune")
    ranks = max(rule_resources(config, "finetune")["gpu"], 1)  # torchrun: a process per GPU
    tokens = math.ceil(s.batch_size / ranks) * config["corpus"]["block_size"]  # each rank's slice of a micro-batch
    act = 2 if _on_gpu(config, "finetune") and s.mixed_precision != "no" else shape.dtype_bytes  # bf16 autocast
    group = largest_group(config, model)
    train = (
        train_activation_bytes(shape, tokens, s.gradient_checkpointing, group, act)
        + lora_parameters(shape, s.lora_r, s.target_modules, shape.layers) * LORA_BYTES_PER_PARAMETER
        + tokens * shape.vocab * KD_BYTES_PER_LOGIT  # at most: the lm loss alone keeps less
    )
    # before and after training, divergence() scores the held-out blocks 4 at a time, without autograd
    held_out = 4 * config["corpus"]["block_size"] * shape.vocab * (SCORE_BYTES_PER_LOGIT + shape.dtype_bytes)
    # both splits memory-mapped (run_finetune): the page cache holds what the ranks read once, for all of them
    corpus = mapped_split_bytes(shape, config, s.split) + mapped_split_bytes(shape, config, s.eval_split)
    return weight_bytes(shape) + max(train, held_out), corpus, ranks


def evaluate_need(shape: Shape, config: dict, model: str):
    tokens = section_settings(config, "evaluate").batch_size * EVAL_TOKENS
    logits = tokens * shape.vocab * 2 * shape.dtype_bytes  # logits and lm-eval's log-softmax, in the model's dtype
    compute = weight_bytes(shape) + kv_cache_bytes(shape, tokens) + logits + working_bytes(shape, tokens)
    return compute, 0, 1


def latency_setups(config: dict, model: str) -> list[Setup]:
    """The setups the latency rule times for a model (as workflow/rules/common.smk lists them)."""
    entry, wanted = config["catalog"][model], config["latency_setups"]
    plans = dict.fromkeys(wanted["plans"] + entry.get("plans", []))
    degrees = [n for n in wanted["tp_degrees"] if entry["heads"] % n == 0 and entry["kv_heads"] % n == 0]
    return [Setup("original")] + [Setup.parse(f"cqil-{p}") for p in plans] + [Setup("tp", degree=n) for n in degrees]


def latency_need(shape: Shape, config: dict, model: str):
    s = section_settings(config, "latency")
    ranks = max(setup.ranks for setup in latency_setups(config, model))
    copies = 2 if s.interleaved_baseline and ranks > 1 else 1  # rank 0 keeps the original beside the engine
    prompt = s.batch_size * max(s.prompt_lengths)
    cache = kv_cache_bytes(shape, s.batch_size * (max(s.prompt_lengths) + s.new_tokens))
    return copies * weight_bytes(shape) + cache + working_bytes(shape, prompt), 0, ranks  # each rank loads it whole


def corpus_need(shape: Shape, config: dict, model: str):
    s = section_settings(config, "corpus")
    tokens = sum(s.blocks.values()) * s.block_size
    arrays = tokens * token_dtype(shape.vocab).itemsize  # the splits, preallocated (cqil/data.py)
    if s.source != "generate":
        return 0, arrays, 1
    written = s.batch_size * (s.max_new_tokens + 64)  # documents written at once: prompt and new tokens
    return weight_bytes(shape) + kv_cache_bytes(shape, written) + working_bytes(shape, written), arrays, 1


RULES = {  # rule -> what one job of it needs; the rules that load a model
    "corpus": corpus_need,
    "similarity": similarity_need,
    "sensitivity": scoring_need("sensitivity"),
    "search": scoring_need("search"),
    "score": scoring_need("score"),
    "baselines": scoring_need("baselines"),
    "finetune": finetune_need,
    "evaluate": evaluate_need,
    "latency": latency_need,
}


def rule_resources(config: dict, rule: str) -> dict:
    """A rule's entry in config.resources over the default (as workflow/rules/common.smk reads it)."""
    return {**config["resources"]["default"], **config["resources"].get(rule, {})}


def _on_gpu(config: dict, rule: str) -> bool:
    return rule_resources(config, rule)["gpu"] > 0 and config.get("device", "auto") != "cpu"


def job_memory(rule: str, model: str, config: dict) -> Memory | None:
    """Host memory of a job of `rule` for `model` and the memory of each of its GPUs; None: shape unknown."""
    shape = catalog_shape(config, model)
    if shape is None:
        return None
    # compute: what one rank computes on; corpus: what the whole job holds of the corpus; ranks: its processes
    compute, corpus, ranks = RULES[rule](shape, config, model)
    on_gpu = _on_gpu(config, rule) and compute > 0  # a corpus job without a model to write text uses no GPU
    process = PROCESS_BYTES + (CUDA_HOST_BYTES if on_gpu else 0)
    host = ranks * (process + (0 if on_gpu else compute)) + corpus
    return Memory(host=host, gpu=compute + CUDA_DEVICE_BYTES if on_gpu else 0, ranks=ranks)


def jobs(config: dict) -> list[tuple[str, str]]:
    """(rule, model) of every job kind the run has that loads a model."""
    models, timed = config["models"], (config.get("latency_setups") or {"models": []})["models"]
    baselines = BaselinesSettings(**config["baselines"]).active if "baselines" in config else False
    return [
        (rule, model)
        for rule in RULES
        for model in (timed if rule == "latency" else models)
        if rule != "baselines" or baselines
    ]


# --- the check ---------------------------------------------------------------------------------------------------


BATCHED = ("similarity", "sensitivity", "search", "score", "baselines", "finetune", "evaluate")  # section.batch_size


def _gib(n: int) -> str:
    return f"{n / GIB:.0f} GiB" if n >= 10 * GIB else f"{n / GIB:.1f} GiB"


def _edited(config: dict, section: str, **values) -> dict:
    return {**config, section: {**config.get(section, {}), **values}}


def _gpu_fix(rule: str, model: str, config: dict, limit: int) -> str:
    """The first change that makes the job fit its GPU: checkpointing, a smaller batch, else a larger GPU."""
    tries = []
    if rule == "finetune" and not section_settings(config, "finetune").gradient_checkpointing:
        tries.append(
            ("set finetune.gradient_checkpointing: true", _edited(config, "finetune", gradient_checkpointing=True))
        )
    if rule in BATCHED:
        current = section_settings(config, rule).batch_size
        tries += [
            (f"set {rule}.batch_size: {b}", _edited(config, rule, batch_size=b)) for b in range(current - 1, 0, -1)
        ]
    for fix, edited in tries:
        if job_memory(rule, model, edited).gpu <= limit:
            return fix
    need = job_memory(rule, model, config).gpu
    return f"set resources.{rule}.gpu_mem_mb to at least {math.ceil(need / MIB)} (a larger GPU)"


def check_memory(config: dict) -> None:
    """Each job's host memory against its mem_mb, and each of its GPUs' against gpu_mem_mb: one line if one fails."""
    for rule, model in jobs(config):
        need = job_memory(rule, model, config)
        if need is None:
            continue
        res = rule_resources(config, rule)
        if need.host > res["mem_mb"] * MIB:
            ask = math.ceil(need.host / MIB / 1000) * 1000
            raise ConfigError(
                f"config.resources.{rule}.mem_mb: {rule} of {model} needs ~{_gib(need.host)} of host memory "
                f"({need.ranks} process{'es' if need.ranks > 1 else ''}), the job asks for {res['mem_mb']} MB: "
                f"set resources.{rule}.mem_mb: {ask}"
            )
        if need.gpu and "gpu_mem_mb" in res and need.gpu > res["gpu_mem_mb"] * MIB:
            raise ConfigError(
                f"config.resources.{rule}: {rule} of {model} needs ~{_gib(need.gpu)} per GPU, the GPU has "
                f"{_gib(res['gpu_mem_mb'] * MIB)}: {_gpu_fix(rule, model, config, res['gpu_mem_mb'] * MIB)}"
            )
