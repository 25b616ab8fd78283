"""Every `cqil latency` run checks itself: the engine's logits against a single-process reference, in the same run.

The check teacher-forces the engine with the reference's greedy tokens over a padded batch (which exercises the
masks) and compares every logit: cqil against the single-process simulation of its plan (cqil/transform.py), tp
against the original model, a static or compiled decoder against the same model run eagerly. A pruned model is
that single-process transform itself, so it has no check (tests/test_transform.py tests its equivalence).
"""

from __future__ import annotations

import torch

from ..decode import Decoder
from ..plan import Setup
from .settings import LatencySettings
from .timing import prompts


def reference_run(model, settings: LatencySettings, device):
    """The check's padded batch and the reference logits and greedy tokens on it: the model run eagerly."""
    ids, mask = prompts(
        model.config.vocab_size,
        settings.check_batch_size,
        settings.check_length,
        settings.seed + 1,
        pad=settings.check_length // 4 if settings.check_batch_size > 1 else 0,
    )
    ids, mask = ids.to(device), mask.to(device)
    logits, _ = Decoder(model).generate(ids, mask, settings.check_new_tokens, keep=0)
    forced = torch.stack([step[:, -1].argmax(-1) for step in logits[:-1]], dim=1)
    return ids, mask, forced, logits


def compare(decoder: Decoder, reference) -> dict:
    """Max |logit difference| and argmax agreement of an engine (its decoder) against the reference, teacher-forced."""
    ids, mask, forced, expected = reference
    logits, _ = decoder.generate(ids, mask, forced.shape[1], keep=0, forced=forced)
    real = mask.bool()  # prefill positions that are tokens, not padding
    pairs = [(logits[0][real], expected[0][real])] + [(a[:, -1], b[:, -1]) for a, b in zip(logits[1:], expected[1:])]
    got, want = torch.cat([a for a, _ in pairs]).double(), torch.cat([b for _, b in pairs]).double()
    return {
        "max_abs_diff": float((got - want).abs().max()),
        "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).double().mean()),
        "reference_max_abs": float(want.abs().max()),
        "positions": len(got),
        "batch_size": len(ids),
        "decode_steps": forced.shape[1],
    }


# What the check allows between an engine's logits and its single-process reference, by dtype:
# (absolute, relative to the largest |reference logit|). Both sides run the same weights in the same
# dtype, so only the order of the additions differs (the all-reduce, TP's split matmuls). float32: 1e-4
# absolute, the tests' tolerance. bfloat16 and float16 keep 8 and 11 significant bits, and that drift
# grows with width and depth: TP's row-parallel partial sums are rounded before they are added. The
# bf16 limit is set from TP 2 at LLaMA-7B width on a GPU, the widest drift seen (docs/gpu.md has the
# measured drifts); a broken engine misses by far more (the plan itself, an
# unfilled cache slot).
CHECK_TOLERANCE = {"float64": (1e-8, 0.0), "float32": (1e-4, 0.0), "bfloat16": (0.0, 0.10), "float16": (0.0, 0.01)}


def check_limit(check: dict, dtype) -> float:
    """The largest |logit difference| `CHECK_TOLERANCE` allows this check in `dtype`."""
    absolute, relative = CHECK_TOLERANCE[str(dtype).removeprefix("torch.")]
    return absolute + relative * check["reference_max_abs"]


def check_failure(check: dict, setup: Setup, dtype) -> str | None:
    """Why the check fails (logits beyond `CHECK_TOLERANCE` of the reference), in one line; None if it passes."""
    limit, diff = check_limit(check, dtype), check["max_abs_diff"]
    if diff <= limit:  # NaN fails
        return None
    what = f"plan {setup.plan}" if setup.plan else f"degree {setup.degree}"
    return (
        f"engine {setup.engine}, {what}: check failed, max |logit difference| {diff:.3g} against the single-process "
        f"reference exceeds {limit:.3g} ({str(dtype).removeprefix('torch.')}); no timing was written"
    )
