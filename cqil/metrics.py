"""Quality of a model's next-token predictions against the tokens and against the original model.

    perplexity(model, token_ids, block_size=512)           # {"perplexity": 22.97, "nll": 3.13, "tokens": 7154}
    sums = token_sums(log_probs(logits), ids, reference)   # per batch; add_sums over batches
    summarize(sums)                                        # perplexity, KL(original || model), top-1 agreement

Always measured on the model as it is in memory (a plan applied, adapters loaded). The search, the
analysis, fine-tuning and scoring share these sums, so every stage reports the same quantities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import CqilError


def blocks(token_ids: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """Non-overlapping blocks of `block_size` tokens; a last shorter block is kept if it predicts anything."""
    return [b for b in token_ids.split(block_size) if len(b) > 1]


@torch.inference_mode()
def block_nll(model, token_ids: torch.Tensor, block_size: int = 512, progress: bool = True) -> list[dict]:
    """Summed next-token NLL and predicted tokens of each block of `block_size` tokens of a 1-D tensor of ids.

    Each block is scored on its own (no context carried over), as in the usual strided evaluation with
    stride = block size.
    """
    device = next(model.parameters()).device
    found = []
    for block in tqdm(blocks(token_ids, block_size), desc="perplexity", unit="block", disable=not progress):
        ids = block[None].to(device)  # (1, T)
        found.append(token_sums(log_probs(model(input_ids=ids).logits), ids))
    if not found:
        raise CqilError("perplexity: the text has fewer than 2 tokens")
    return found


def perplexity(model, token_ids: torch.Tensor, block_size: int = 512, progress: bool = True) -> dict:
    """exp(mean next-token negative log-likelihood) over the blocks of a 1-D tensor of token ids."""
    total = {}
    for sums in block_nll(model, token_ids, block_size, progress):
        total = add_sums(total, sums)
    return summarize(total)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities, at least float32: (B, T, V) -> (B, T-1, V); row t predicts token t+1."""
    return F.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def token_sums(logp: torch.Tensor, input_ids: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
    """Sums over the predicted positions of a batch: NLL of the next token and, against the original
    model's log-probabilities `reference`, KL(original || model) and top-1 agreement.

    logp, reference: (B, T-1, V) from `log_probs`; input_ids: (B, T).
    """
    sums = {"nll": -logp.gather(-1, input_ids[:, 1:, None]).sum().item(), "tokens": logp.shape[0] * logp.shape[1]}
    if reference is not None:
        sums["kl"] = F.kl_div(logp, reference, log_target=True, reduction="sum").item()  # sum p_ref (log p_ref - log p)
        sums["top1"] = (logp.argmax(-1) == reference.argmax(-1)).sum().item()
    return sums


def add_sums(total: dict, sums: dict) -> dict:
    return {key: total.get(key, 0) + value for key, value in sums.items()}


def summarize(sums: dict) -> dict:
    """Perplexity, mean KL(original || model) in nats per token, and top-1 agreement with the original."""
    n = sums["tokens"]
    out = {"perplexity": math.exp(sums["nll"] / n), "nll": sums["nll"] / n, "tokens": n}
    if "kl" in sums:
        out |= {"kl": sums["kl"] / n, "top1": sums["top1"] / n}
    return out
