"""Tiny random models built in memory (no downloads), the path to the shared evaluation data, a copy of
the checkout for the tests that run the DAG (they write there, so the checkout stays as it was), and a
headless browser that renders a page."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hugging Face Hub
# The embedded model, converted once per machine outside the checkout (cqil.models.resources_dir)
os.environ.setdefault("CQIL_RESOURCES", str(Path(tempfile.gettempdir()) / "cqil-tests-resources"))
# As pyproject.toml's filterwarnings, for the processes the tests start: a deprecated cache keyword fails.
os.environ.setdefault("PYTHONWARNINGS", "error:`past_key_values` is deprecated:FutureWarning")

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def checkout_copy(dest: Path) -> Path:
    """The repository's files (tracked, and untracked ones git does not ignore; links kept) copied into `dest`."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source, target = ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():  # a deleted file git still lists is skipped
            shutil.copy2(source, target)
    return dest


TINY = dict(  # the tiny models' settings, for every family
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,  # large weights: every layer changes its input a lot
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def tiny_config(family="llama", layers=8, **overrides):
    return FAMILIES[family](**TINY | dict(num_hidden_layers=layers) | overrides)


def tiny_model(family="llama", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    return model.eval()


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def assert_cached_generation_equals_recompute(model, plan, tokens=8, atol=1e-4):
    """Greedy decoding with the KV cache == recomputing the whole left-padded sequence every token, under `plan`."""
    from cqil import apply_plan
    from cqil.layers import CACHE

    apply_plan(model, plan)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # row 0 is left-padded by two tokens
    model.generation_config.eos_token_id = None  # no stopping and no EOS suppression: plain argmax
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
    )
    # every layer, grouped or not, has its own cache entry holding every position (a pruned layer none)
    cache, removed, layers = getattr(out, CACHE), getattr(plan, "removed", ()), model.config.num_hidden_layers
    assert len(cache.layers) == layers
    window = getattr(model.config, "sliding_window", None) or 10**9
    for i, layer in enumerate(cache.layers):
        if i not in removed:
            assert layer.keys.shape[-2] in (6 + tokens - 1, min(window, 6 + tokens - 1), window - 1)
    seq = ids
    with torch.no_grad():
        for step in range(tokens):
            full_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], dim=1)
            pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=full_mask, position_ids=pos, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, atol=atol, rtol=atol)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 96 ids: `w0 .. w91` plus four special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(92)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


@pytest.fixture
def tiny_dir(tmp_path):
    """A saved tiny llama (float32) with its tokenizer: a local model directory for load_model and the CLI."""
    model = tiny_model("llama", dtype=torch.float32)
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def rendered(html: Path, png: Path) -> str:
    """Headless Chromium (Debian's `chromium`) renders the page to a screenshot that is not blank; returns the
    page's DOM as the browser built it."""
    import matplotlib.image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium: install Debian's `chromium` to check that the page renders")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    shot = [f"--screenshot={png}", "--window-size=1280,2000", html.as_uri()]
    subprocess.run([*flags, *shot], check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (2000, 1280) and pixels.std() > 0.05  # text and figures, not an empty page
    dom = subprocess.run([*flags, "--dump-dom", html.as_uri()], check=True, capture_output=True, text=True, timeout=120)
    return dom.stdout
