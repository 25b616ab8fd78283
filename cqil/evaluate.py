"""Quality of a (possibly CQIL) model: perplexity over token blocks.

    perplexity(model, token_ids, block_size=512)   # {"perplexity": 22.97, "nll": 3.13, "tokens": 7154}

Later stages add lm-eval tasks here; every score is computed on the in-memory model, so a plan
applied with `apply_plan` is what gets measured.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def blocks(token_ids: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """Non-overlapping blocks of `block_size` tokens; a last shorter block is kept if it predicts anything."""
    return [b for b in token_ids.split(block_size) if len(b) > 1]


@torch.inference_mode()
def perplexity(model, token_ids: torch.Tensor, block_size: int = 512, progress: bool = True) -> dict:
    """exp(mean next-token negative log-likelihood) over the blocks of a 1-D tensor of token ids.

    Each block is scored on its own (no context carried over), as in the usual strided evaluation
    with stride = block size.
    """
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for block in tqdm(blocks(token_ids, block_size), desc="perplexity", unit="block", disable=not progress):
        ids = block[None].to(device)  # (1, T)
        logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V): position t predicts t+1
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(block) - 1
    if count == 0:
        raise ValueError("perplexity: the text has fewer than 2 tokens")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
