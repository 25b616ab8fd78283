"""Corpus blocks: whole documents per split, disjoint splits, deterministic builds, compact files, clear errors."""

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED_DATA

from cqil.data import SPLITS, CorpusSettings, Packer, build_corpus, load_split, open_split, run_corpus, token_dtype
from cqil.errors import CqilError
from cqil.models import load_tokenizer

SMALL = {"calibration": 2, "search": 1, "finetune": 3, "test": 2}


def list_pack(documents: list[list[int]], settings: CorpusSettings) -> dict[str, torch.Tensor] | None:
    """The packing as it was done before the arrays (Python lists, git 08188f0): the reference they must match."""
    docs, out = iter(documents), {}
    for split in SPLITS:
        need, tokens = settings.blocks[split] * settings.block_size, []
        while len(tokens) < need:
            doc = next(docs, None)
            if doc is None:
                return None
            tokens += doc
        out[split] = torch.tensor(tokens[:need], dtype=torch.long).view(-1, settings.block_size)
    return out


def pack(documents, settings: CorpusSettings, dtype=np.uint16) -> tuple[dict[str, np.ndarray], int] | None:
    """The Packer driven as build_corpus drives it: (blocks, documents read), or None if they are too few."""
    packer = Packer(settings, np.dtype(dtype))
    for read, document in enumerate(documents, 1):
        packer.add(document)
        if packer.full:
            return packer.blocks, read
    return None


def test_pack_gives_each_split_whole_documents():
    documents = [[doc] * (3 + doc % 5) for doc in range(100)]  # document d is made of token d only
    blocks, _ = pack(documents, CorpusSettings(block_size=8, blocks=SMALL))
    assert {s: b.shape for s, b in blocks.items()} == {s: (n, 8) for s, n in SMALL.items()}
    owners = [set(np.unique(blocks[s]).tolist()) for s in SPLITS]
    for i in range(len(owners)):
        for j in range(i):
            assert not owners[i] & owners[j]  # no document is shared by two splits
    assert pack(documents[:5], CorpusSettings(block_size=8, blocks=SMALL)) is None


@pytest.mark.parametrize("seed", range(20))
def test_arrays_give_the_blocks_of_the_list_packing(seed):
    """Same blocks, same order, and the same documents read (the build stops at the first prefix that fills)."""
    rng = random.Random(seed)
    settings = CorpusSettings(block_size=rng.choice([4, 8, 16]), blocks={s: rng.randint(1, 4) for s in SPLITS})
    # lengths around a block, some exactly one: a document that ends a split exactly must not spill
    lengths = [rng.choice([1, settings.block_size, rng.randint(1, 3 * settings.block_size)]) for _ in range(80)]
    documents = [[rng.randrange(2**16) for _ in range(n)] for n in lengths]
    found = pack(documents, settings)
    first = next((k for k in range(len(documents) + 1) if list_pack(documents[:k], settings)), None)
    if first is None:
        assert found is None
        return
    blocks, read = found
    assert read == first
    expected = list_pack(documents, settings)
    assert all(torch.equal(torch.from_numpy(blocks[s]).long(), expected[s]) for s in SPLITS)


def test_build_gives_the_blocks_of_the_list_packing(tiny_dir, tmp_path):
    """The whole build (tokenizer, documents, arrays) on a small text stream against the list packing."""
    rng = random.Random(1)
    lines = [" ".join(f"w{rng.randrange(92)}" for _ in range(rng.randint(1, 30))) for _ in range(200)]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(lines) + "\n")
    settings = CorpusSettings(source="files", files=[str(path)], block_size=16, blocks=SMALL)
    blocks, summary = build_corpus(str(tiny_dir), settings)
    tokenizer = load_tokenizer(str(tiny_dir))
    documents = [tokenizer(line + "\n\n", add_special_tokens=False)["input_ids"] for line in lines]
    expected = list_pack(documents[: summary["documents"]], settings)
    assert all(torch.equal(blocks[s].long(), expected[s]) for s in SPLITS)
    assert list_pack(documents[: summary["documents"] - 1], settings) is None  # it read no document too many


@pytest.mark.parametrize(
    "vocab, dtype", [(96, np.uint16), (32000, np.uint16), (2**16, np.uint16), (2**16 + 1, np.int32), (152064, np.int32)]
)
def test_token_dtype_is_the_narrowest_that_holds_the_vocabulary(vocab, dtype):
    assert token_dtype(vocab) == np.dtype(dtype)
    assert np.array([vocab - 1], dtype=token_dtype(vocab))[0] == vocab - 1


def test_the_corpus_file_is_compact_and_read_memory_mapped(tiny_dir, tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("".join(f"w{i % 92} w{(i + 1) % 92} w{(i + 2) % 92}\n" for i in range(200)))
    out = tmp_path / "corpus.pt"
    settings = CorpusSettings(source="files", files=[str(path)], block_size=8, blocks=SMALL)
    run_corpus(settings, model=str(tiny_dir), out=out, summary=tmp_path / "corpus.json")
    blocks = {s: open_split(out, s) for s in SPLITS}
    assert {s: (b.dtype, tuple(b.shape)) for s, b in blocks.items()} == {
        s: (torch.uint16, (n, 8)) for s, n in SMALL.items()
    }
    stored = sum(b.untyped_storage().nbytes() for b in blocks.values())
    assert stored == 2 * 8 * sum(SMALL.values())  # 2 bytes a token, no wider copy behind the views
    assert str(out.resolve()) in Path("/proc/self/maps").read_text()  # mapped from the file, not read into memory
    ids = load_split(out, "finetune")
    assert ids.dtype == torch.long and torch.equal(ids, blocks["finetune"].long())


def heap_peak(model: str, path: Path, tokens: int) -> int:
    """Python's heap at its peak (tracemalloc, which numpy reports to) while building `tokens` tokens from `path`."""
    blocks = {"calibration": 1, "search": 1, "finetune": tokens // 256 - 3, "test": 1}
    settings = CorpusSettings(source="files", files=[str(path)], block_size=256, blocks=blocks)
    tracemalloc.start()
    try:
        built, _ = build_corpus(model, settings)
        assert all(b.dtype == torch.uint16 for b in built.values())
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_build_holds_a_few_bytes_per_token(tiny_dir, tmp_path):
    """What a token more costs at the peak: the arrays' 2 bytes, where lists of ids held a pointer (8 bytes) per
    token and packing copied them once more. Two sizes, so the tokenizer and one document's ids cancel out."""
    rng = random.Random(0)
    path = tmp_path / "docs.txt"
    path.write_text("".join(" ".join(f"w{rng.randrange(92)}" for _ in range(500)) + "\n" for _ in range(420)))
    small, large = 256 * 400, 256 * 800
    per_token = (heap_peak(str(tiny_dir), path, large) - heap_peak(str(tiny_dir), path, small)) / (large - small)
    assert per_token < 4, f"{per_token:.1f} bytes a token at the peak"


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(source="web"), "corpus.source: 'web' is not one of generate, files, hub"),
        (dict(blocks={"search": 1}), "need exactly the splits calibration, search, finetune, test"),
        (dict(source="files", files=[]), "source=files needs at least one file"),
        (dict(source="files", files=["nowhere.txt"]), r"corpus.files\[0\]: 'nowhere.txt' not found"),
        (dict(source="hub"), "source=hub needs a dataset id"),
    ],
)
def test_bad_settings_fail_with_one_line(settings, message):
    with pytest.raises(CqilError, match=message):
        CorpusSettings(**settings)


def test_generated_corpus_is_deterministic(tiny_dir):
    settings = CorpusSettings(source="generate", block_size=16, blocks=SMALL, max_new_tokens=12, batch_size=4, seed=3)
    first, summary = build_corpus(str(tiny_dir), settings)
    second, _ = build_corpus(str(tiny_dir), settings)
    assert all(torch.equal(first[s], second[s]) for s in SPLITS)
    assert summary["blocks"] == SMALL and summary["documents"] >= 8
    other, _ = build_corpus(str(tiny_dir), CorpusSettings(**{**settings.__dict__, "seed": 4}))
    assert not torch.equal(first["test"], other["test"])


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "device 'tpu': allowed are auto, cpu, cuda"),
        pytest.param(
            "cuda",
            "device 'cuda': torch sees no CUDA device here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the model loads on it"),
        ),
    ],
)
def test_the_generating_model_loads_on_the_device_asked_for(tiny_dir, device, message):
    settings = CorpusSettings(source="generate", block_size=16, blocks=SMALL, max_new_tokens=12, batch_size=4)
    with pytest.raises(CqilError, match=message):
        build_corpus(str(tiny_dir), settings, device=device)


def test_jsonl_files(tiny_dir, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"w{i} w{i + 1} w{i + 2} w{i + 3}"}) + "\n" for i in range(60)))
    blocks, summary = build_corpus(
        str(tiny_dir), CorpusSettings(source="files", files=[str(path)], text_field="body", block_size=8, blocks=SMALL)
    )
    assert blocks["calibration"][0, :4].tolist() == [4, 5, 6, 7]  # "w0 w1 w2 w3" in the tiny vocabulary
    with pytest.raises(CqilError, match="gave 60 documents"):
        build_corpus(
            str(tiny_dir),
            CorpusSettings(source="files", files=[str(path)], text_field="body", block_size=64, blocks=SMALL),
        )


@pytest.mark.slow
def test_wikitext_from_shared_data():
    wikitext = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    if not wikitext.exists():
        pytest.skip(f"{wikitext} not found")
    blocks, summary = build_corpus(
        "smollm2-135m", CorpusSettings(source="files", files=[str(wikitext)], block_size=128, blocks=SMALL)
    )
    assert summary["samples"][0].startswith("= Robert Boulter =")
    assert sum(len(b) for b in blocks.values()) == sum(SMALL.values())


def test_the_shipped_data_is_byte_exact_and_listed():
    """data/ holds exactly the files SHA256SUMS lists, each with its checksum, which is the shared copy's."""
    import hashlib

    data = ROOT / "data"
    listed = dict(reversed(line.split(maxsplit=1)) for line in (data / "SHA256SUMS").read_text().splitlines())
    present = {f"./{p.relative_to(data)}" for p in data.rglob("*") if p.is_file()} - {"./SHA256SUMS", "./SOURCES.md"}
    assert set(listed) == present
    for name, digest in listed.items():
        assert hashlib.sha256((data / name).read_bytes()).hexdigest() == digest, name
    if (SHARED_DATA / "SHA256SUMS").exists():
        shared = set((SHARED_DATA / "SHA256SUMS").read_text().splitlines())
        assert all(f"{digest}  {name}" in shared for name, digest in listed.items())
