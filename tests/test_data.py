"""Corpus blocks: whole documents per split, disjoint splits, deterministic builds, clear errors."""

import json

import pytest
import torch
from conftest import ROOT, SHARED_DATA

from cqil.data import SPLITS, CorpusSettings, build_corpus, pack
from cqil.errors import CqilError

SMALL = {"calibration": 2, "search": 1, "finetune": 3, "test": 2}


def test_pack_gives_each_split_whole_documents():
    documents = [[doc] * (3 + doc % 5) for doc in range(100)]  # document d is made of token d only
    blocks = pack(documents, CorpusSettings(block_size=8, blocks=SMALL))
    assert {s: tuple(b.shape) for s, b in blocks.items()} == {s: (n, 8) for s, n in SMALL.items()}
    owners = [set(blocks[s].unique().tolist()) for s in SPLITS]
    for i in range(len(owners)):
        for j in range(i):
            assert not owners[i] & owners[j]  # no document is shared by two splits
    assert pack(documents[:5], CorpusSettings(block_size=8, blocks=SMALL)) is None


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
