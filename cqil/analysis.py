"""Why CQIL works, measured: layer-input similarity and the sensitivity of each layer to an earlier input.

    similarity(model, blocks)             # (L, L) mean cosine between the inputs of layers i and j
    sensitivity(model, blocks, (1, 2))    # rows: layer i run on the input of layer i-k

Both run the original model layer by layer on corpus blocks (no padding inside blocks). The stages
`run_similarity` and `run_sensitivity` write them as CSV tables, with a JSON summary beside each.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data import load_split
from .errors import CqilError
from .io import provenance, write_csv, write_json
from .layers import decoder_layers, layer_inputs, lm_logits, run_layers
from .metrics import add_sums, log_probs, summarize, token_sums
from .models import load_model
from .runtime import resolve_device
from .transform import planned


@dataclass(frozen=True)
class SimilaritySettings:
    split: str = "calibration"  # corpus blocks to measure on
    batch_size: int = 4


@dataclass(frozen=True)
class SensitivitySettings:
    split: str = "calibration"
    distances: list = field(default_factory=lambda: [1, 2])  # layer i runs on the input of layer i-k
    batch_size: int = 2


@torch.inference_mode()
def similarity(model, blocks: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """Mean over tokens of cos(h_i, h_j), h_i the input of layer i: an (L, L) float64 matrix.

    Cosines are taken per token and then averaged, so no token dominates by its norm; the first
    token of each block is left out (its attention-sink state is an outlier in every layer).
    """
    if blocks.shape[1] < 2:
        raise CqilError(f"similarity: blocks of {blocks.shape[1]} token(s) have nothing after the first token")
    gram, count = 0.0, 0
    with planned(model, None):
        for batch in tqdm(blocks.split(batch_size), desc="similarity", unit="batch"):
            inputs, _, _ = layer_inputs(model, batch)
            gram = gram + cosine_gram(inputs)
            count += batch.shape[0] * (batch.shape[1] - 1)
    return (gram / count).cpu().numpy()


def cosine_gram(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The sum over tokens (the first of each block left out) of cos(h_i, h_j) for L layer inputs (B, T, C):
    an (L, L) float64 matrix.

    In float64, but a chunk of positions at a time: every layer's states at ceil((T-1)/L) positions, as many
    values as one layer's states, instead of all of them at once (three float64 copies of every layer's
    states did not fit a large model's GPU beside its weights: docs/cost.md).
    """
    layers, length = len(inputs), inputs[0].shape[1]
    width = math.ceil((length - 1) / layers)
    gram = torch.zeros(layers, layers, dtype=torch.float64, device=inputs[0].device)
    for start in range(1, length, width):
        _add_chunk(gram, inputs, start, min(start + width, length))
    return gram


def _add_chunk(gram: torch.Tensor, inputs: list[torch.Tensor], start: int, stop: int) -> None:
    """Add the cosines of positions [start, stop) of every layer pair to `gram`, in place."""
    first = inputs[0]
    chunk = first.new_empty((len(inputs), first.shape[0], stop - start, first.shape[2]), dtype=torch.float64)
    for i, h in enumerate(inputs):  # written in place: no stacked copy in the model's dtype beside it
        chunk[i].copy_(h[:, start:stop])
    chunk /= chunk.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize, without its full-size result
    flat = chunk.view(len(inputs), -1)
    gram.addmm_(flat, flat.T)  # a transposed view: BLAS reads it as it is, no copy of either operand


@torch.inference_mode()
def sensitivity(model, blocks: torch.Tensor, distances=(1, 2), batch_size: int = 2) -> list[dict]:
    """For each layer i and k in `distances`: layer i computes its delta from the input of layer i-k,
    the rest of the model is unchanged. This is what CQIL asks of a layer grouped with the k layers
    before it; k=1 is a group of the pair (i-1, i) alone.

    h_{i+1} = h_i + (layer_i(h_{i-k}) - h_{i-k})  instead of  layer_i(h_i)

    Returns one row per (layer, k) with perplexity, KL to the original and top-1 agreement, plus
    the original's row (layer -1).
    """
    num_layers = len(decoder_layers(model))
    variants = [(i, k) for k in distances for i in range(k, num_layers)]
    totals = {}
    with planned(model, None):
        for batch in tqdm(blocks.split(batch_size), desc="sensitivity", unit="batch"):
            for variant, sums in _sensitivity_sums(model, batch.to(next(model.parameters()).device), variants):
                totals[variant] = add_sums(totals.get(variant, {}), sums)
    return [{"layer": i, "distance": k, **summarize(sums)} for (i, k), sums in totals.items()]


def _sensitivity_sums(model, batch: torch.Tensor, variants):
    """Yield ((layer, k), token sums) for the original ((-1, 0)) and each variant on one batch."""
    num_layers = len(decoder_layers(model))
    inputs, output, kwargs = layer_inputs(model, batch)
    reference = log_probs(lm_logits(model, output))  # once per batch, shared by every variant
    yield (-1, 0), token_sums(reference, batch, reference)
    for i, k in variants:
        early = inputs[i - k]
        hidden = inputs[i] + run_layers(model, early, kwargs, range(i, i + 1)) - early
        hidden = run_layers(model, hidden, kwargs, range(i + 1, num_layers))
        yield (i, k), token_sums(log_probs(lm_logits(model, hidden)), batch, reference)


def run_similarity(
    settings: SimilaritySettings, *, model: str, corpus, out, dtype: str = "auto", device: str = "auto"
) -> None:
    """The stage: the similarity matrix as a long CSV (layer_i, layer_j, cosine), adjacent pairs in a JSON beside it."""
    blocks = load_split(corpus, settings.split)
    where = resolve_device(device)
    matrix = similarity(load_model(model, dtype=dtype, device=where)[0], blocks, batch_size=settings.batch_size)
    size = len(matrix)
    write_csv(
        out,
        pd.DataFrame(
            {
                "layer_i": np.repeat(np.arange(size), size),
                "layer_j": np.tile(np.arange(size), size),
                "cosine": matrix.ravel(),
            }
        ),
    )
    write_json(
        Path(out).with_suffix(".json"),
        {
            "adjacent": [float(matrix[i, i + 1]) for i in range(size - 1)],
            "blocks": len(blocks),
            "provenance": provenance(
                {"model": model, "dtype": dtype, "device": str(where), "settings": asdict(settings)}
            ),
        },
    )


def run_sensitivity(
    settings: SensitivitySettings, *, model: str, corpus, out, dtype: str = "auto", device: str = "auto"
) -> None:
    """The stage: perplexity and KL when layer i computes from the input of layer i-k, a CSV row per (i, k)."""
    blocks = load_split(corpus, settings.split)
    where = resolve_device(device)
    loaded = load_model(model, dtype=dtype, device=where)[0]
    rows = sensitivity(loaded, blocks, settings.distances, batch_size=settings.batch_size)
    write_csv(out, pd.DataFrame(rows))
    write_json(
        Path(out).with_suffix(".json"),
        {
            "blocks": len(blocks),
            "provenance": provenance(
                {"model": model, "dtype": dtype, "device": str(where), "settings": asdict(settings)}
            ),
        },
    )
