"""Greedy decoding in each mode (cqil/decode.py) against the eager, dynamic-cache reference, and the guard that keeps
compilation out of timed repeats."""

import pytest
import torch

from cqil.decode import Decoder, no_recompiles
from cqil.errors import EngineError
from cqil.latency.timing import prompts
from tests.conftest import tiny_model


def generated(decoder, ids, mask, steps=6):
    logits, _ = decoder.generate(ids, mask, steps, keep=0)
    real = mask.bool()
    return torch.cat([logits[0][real]] + [step[:, -1] for step in logits[1:]])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_every_mode_decodes_as_the_eager_reference(family, mode):
    model = tiny_model(family, dtype=torch.float64)
    ids, mask = prompts(model.config.vocab_size, 2, 12, seed=0, pad=3)  # a left-padded row: masks and positions
    expected = generated(Decoder(model), ids, mask)
    decoder = Decoder(model, mode, backend="eager")  # dynamo's capture without code generation (CPU, fast)
    for _ in range(2):  # the second generation reuses the reset cache and the compiled step
        assert torch.allclose(generated(decoder, ids, mask), expected, atol=1e-10)


def test_a_compiled_decoder_never_recompiles_after_its_first_generation():
    model = tiny_model("llama", dtype=torch.float32)
    ids, mask = prompts(model.config.vocab_size, 1, 10, seed=0)
    decoder = Decoder(model, "compiled", backend="eager")
    decoder.generate(ids, mask, 4)  # compiles
    with no_recompiles(decoder):
        for _ in range(3):
            decoder.generate(ids, mask, 4)
    torch._dynamo.reset()


def test_the_static_cache_keeps_its_tensors_across_generations():
    """A compiled step replayed as a CUDA graph reads the cache at fixed addresses (transformers marks them static);
    a new cache per generation (what the GPU script's compiled timing once did) would re-record the graph inside the
    timed loop. The decoder resets one cache per shape instead."""
    model = tiny_model("llama", dtype=torch.float32)
    ids, mask = prompts(model.config.vocab_size, 1, 10, seed=0)
    decoder = Decoder(model, "static")
    decoder.generate(ids, mask, 4)
    (cache,) = decoder.caches.values()
    addresses = [layer.keys.data_ptr() for layer in cache.layers]
    decoder.generate(ids, mask, 4)
    assert list(decoder.caches.values()) == [cache]
    assert [layer.keys.data_ptr() for layer in cache.layers] == addresses


def test_an_unknown_mode_is_refused():
    with pytest.raises(EngineError, match="mode 'graph': allowed are eager, static, compiled"):
        Decoder(tiny_model("llama"), "graph")
