"""Greedy generation with a KV cache, in one of three modes, for every engine (original, cqil, tp, pruned).

    decoder = Decoder(model, "compiled")            # once per engine: one cache, one compiled step
    logits, clock = decoder.generate(ids, mask, new_tokens=32)

- `eager`: a dynamic cache that grows with every token, as `generate()` by default;
- `static`: a static cache of fixed length, still eager (what the cache alone buys);
- `compiled`: the static cache and the decode step through `torch.compile` (on a GPU, inductor's
  "reduce-overhead": the step is replayed as a CUDA graph, as gpt-fast does).

Batch-1 decode on a GPU is bound by kernel launches and Python dispatch, not by arithmetic: an engine
timed eagerly pays for its Python (DTensor's dispatch in tensor parallelism, say), so engines are
compared fairly only in the compiled mode. Two things keep compilation out of the timed repeats: the
decoder keeps one static cache per batch shape and resets it between generations (a new cache has new
tensor addresses, which a compiled step is guarded on), and every step has the same shapes (the
attention mask always spans the whole cache; causality hides the positions not yet written).
`no_recompiles()` makes a recompilation inside a timed repeat an error.
"""

from __future__ import annotations

import contextlib
import time

import torch
from transformers import DynamicCache, StaticCache

from .errors import EngineError
from .layers import with_cache

MODES = ("eager", "static", "compiled")


def check_mode(mode: str, field: str = "mode") -> None:
    if mode not in MODES:
        raise EngineError(f"{field} {mode!r}: allowed are {', '.join(MODES)}")


class Decoder:
    """One model's greedy generation in one mode; reuses its static caches and its compiled step."""

    def __init__(self, model, mode: str = "eager", backend: str = "inductor"):
        check_mode(mode)
        self.model, self.mode = model, mode
        self.caches: dict[tuple[int, int], StaticCache] = {}  # (batch, length) -> its cache
        self.step, self.graphs = model, False
        if mode == "compiled":
            device = next(model.parameters()).device
            graphs = backend == "inductor" and device.type == "cuda"  # CUDA graphs: inductor's option on a GPU
            self.step = torch.compile(model, backend=backend, **({"mode": "reduce-overhead"} if graphs else {}))
            self.graphs = graphs

    def cache(self, batch: int, length: int):
        """An empty cache for `batch` sequences of up to `length` tokens: the same object for the same shape."""
        if self.mode == "eager":
            return DynamicCache(config=self.model.config)
        key = (batch, length)
        if key in self.caches:
            self.caches[key].reset()
        else:
            self.caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
        return self.caches[key]

    def forward(self, forward, ids, mask, start: int, cache, keep: int):
        """One cached forward of `ids` (B, T), the tokens at positions start .. start+T-1; `mask` (B, L) marks the
        real tokens of the whole sequence; logits of the last `keep` positions (0: all)."""
        end = start + ids.shape[1]
        if self.mode == "eager":
            mask = mask[:, :end]  # a dynamic cache: the mask covers what is cached so far
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:end]  # left padding: count real tokens only
        logits = forward(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache_position=torch.arange(start, end, device=ids.device),
            use_cache=True,
            logits_to_keep=keep,
            **with_cache(cache),
        ).logits
        return logits if forward is self.model else logits.clone()  # a CUDA graph overwrites its outputs

    @torch.no_grad()
    def generate(self, ids, mask, new_tokens: int, keep: int = 1, forced=None, sync=lambda: None):
        """Greedy decoding after the prompt `ids` (B, T) with its mask (left padding), or fed `forced` tokens (B, N).

        Returns the logits of the prefill and of each step, and the clock at start, after prefill, at end.
        The prefill runs eagerly; the decode steps run in the decoder's mode.
        """
        batch, length = ids.shape
        total = length + new_tokens
        mask = torch.cat([mask, mask.new_ones(batch, new_tokens)], dim=1)  # every generated token is real
        cache = self.cache(batch, total)
        sync()
        clock = [time.perf_counter()]
        logits = [self.forward(self.model, ids, mask, 0, cache, keep)]
        sync()
        clock.append(time.perf_counter())
        for step in range(new_tokens):
            token = logits[-1][:, -1].argmax(-1) if forced is None else forced[:, step]
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer read
            logits.append(self.forward(self.step, token[:, None], mask, length + step, cache, 1))
        sync()
        clock.append(time.perf_counter())
        return logits, clock


@contextlib.contextmanager
def no_recompiles(decoder: Decoder):
    """Inside: a recompilation of the decoder's compiled step raises (it would be timed as decode time)."""
    if decoder.mode != "compiled":
        yield
        return
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
