"""Token blocks for calibration, search, fine-tuning and test: disjoint and deterministic.

    corpus, summary = build_corpus("smollm2-135m", CorpusSettings(source="generate"))
    corpus["search"]   # (blocks, block_size), uint16 (or int32 for a vocabulary over 65,536 ids)
    run_corpus(CorpusSettings(), model="smollm2-135m", out="corpus.pt", summary="corpus.json")   # the stage
    load_split("corpus.pt", "search")   # LongTensor (blocks, block_size), read from the memory-mapped file

Sources of text:
- `generate` (the offline default): documents written by the model itself, sampled with a fixed seed
  from varied prompts (a writing style x a topic). CQIL's fine-tuning is distillation from the
  original model, so the model's own text is a fair calibration and KD corpus.
- `files`: local text files (one document per non-empty line: WikiText-2's layout) or JSONL files
  (one document per line, in `text_field`).
- `hub`: a Hugging Face dataset, streamed (needs network; the paper config).

Documents are packed in order into the splits (calibration, search, finetune, test): each split takes
whole documents until it has its blocks, so no document is shared by two splits. The tokens go straight
into one preallocated array per split in the narrowest integer type of the vocabulary (2 bytes a token for
LLaMA's), never into Python lists, which cost tens of bytes a token. The corpus file is a torch file of
those arrays, read memory-mapped: a process touches only the split it reads, and the processes of one
machine (the ranks of a fine-tuning job) share its pages.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import CqilError
from .io import atomic, provenance, write_json
from .models import load_model, load_tokenizer
from .runtime import resolve_device
from .transform import remove_plan

SPLITS = ("calibration", "search", "finetune", "test")
SOURCES = ("generate", "files", "hub")

STYLES = [
    "Write a short encyclopedia article about {}.",
    "Explain {} to a curious high-school student.",
    "Write a news report about {}.",
    "Tell a short story in which {} plays a part.",
    "Write a blog post with practical advice about {}.",
    "Describe the history of {} in a few paragraphs.",
]
TOPICS = [
    "bridges",
    "honey bees",
    "the printing press",
    "volcanoes",
    "chess openings",
    "the water cycle",
    "medieval castles",
    "solar panels",
    "the human heart",
    "jazz music",
    "coral reefs",
    "railways",
    "vaccines",
    "the Roman Empire",
    "black holes",
    "bread baking",
    "glaciers",
    "the stock market",
    "octopuses",
    "the internet",
    "ancient Egypt",
    "wind turbines",
    "photosynthesis",
    "lighthouses",
    "the Olympic Games",
    "deserts",
    "clocks and timekeeping",
    "rainforests",
    "the moon landing",
    "coffee",
    "earthquakes",
    "libraries",
    "electric cars",
    "migratory birds",
    "the periodic table",
    "tea ceremonies",
    "submarines",
    "mountaineering",
    "recycling",
    "the violin",
]


@dataclass(frozen=True)
class CorpusSettings:
    source: str = "files"  # files | generate | hub
    block_size: int = 256  # tokens per block
    blocks: dict = field(default_factory=lambda: {"calibration": 8, "search": 8, "finetune": 64, "test": 8})
    seed: int = 0  # sampling seed (generate) and nothing else: files and hub are read in order
    files: list = field(default_factory=lambda: ["data/wikitext-2/wiki.valid.tokens"])  # source=files: text or JSONL
    text_field: str = "text"  # JSONL / hub field that holds a document's text
    hub_path: str | None = None  # source=hub: dataset id, e.g. "allenai/c4"
    hub_name: str | None = None  # source=hub: dataset config, e.g. "en"
    hub_split: str = "train"
    max_new_tokens: int = 256  # source=generate: tokens per generated document
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 16  # source=generate: documents generated at once

    def __post_init__(self):  # messages name the field as config does: a bad config fails before any job
        if self.source not in SOURCES:
            raise CqilError(f"corpus.source: {self.source!r} is not one of {', '.join(SOURCES)}")
        if set(self.blocks) != set(SPLITS):
            raise CqilError(f"corpus.blocks: need exactly the splits {', '.join(SPLITS)}, got {', '.join(self.blocks)}")
        if self.source == "files" and not self.files:
            raise CqilError("corpus.files: source=files needs at least one file")
        for i, path in enumerate(self.files):
            if not Path(path).is_file():
                raise CqilError(f"corpus.files[{i}]: {path!r} not found")
        if self.source == "hub" and not self.hub_path:
            raise CqilError("corpus.hub_path: source=hub needs a dataset id")


def token_dtype(vocab: int) -> np.dtype:
    """The narrowest type that holds ids 0 .. vocab-1: uint16, else int32 (torch has few uint32 kernels)."""
    return np.dtype(np.uint16) if vocab <= 2**16 else np.dtype(np.int32)


class Packer:
    """Fills the splits in order with whole documents, one document at a time, into preallocated arrays.

    A split takes documents until it has its tokens; the document that fills it is cut there and the rest
    of it dropped, so the next split starts with a new document and no document is shared by two splits.
    """

    def __init__(self, settings: CorpusSettings, dtype: np.dtype):
        self.blocks = {s: np.empty((settings.blocks[s], settings.block_size), dtype) for s in SPLITS}
        self._flat = [b.reshape(-1) for b in self.blocks.values()]  # views: filling them fills the blocks
        self._split, self._filled = 0, 0
        self._skip_full()

    @property
    def full(self) -> bool:
        return self._split == len(SPLITS)

    def add(self, document: list[int]) -> int:
        """Place one document (nothing once every split is full); returns the tokens it placed."""
        if self.full:
            return 0
        flat = self._flat[self._split]
        take = min(len(document), len(flat) - self._filled)
        flat[self._filled : self._filled + take] = document[:take]
        self._filled += take
        self._skip_full()
        return take

    def _skip_full(self) -> None:  # so that the current split always has room (a split of 0 blocks has none)
        while not self.full and self._filled == len(self._flat[self._split]):
            self._split, self._filled = self._split + 1, 0


def _file_documents(settings: CorpusSettings):
    for path in map(Path, settings.files):
        with open(path, encoding="utf-8", newline=None) as f:  # newline=None: CRLF files read as LF
            for line in filter(str.strip, f):
                text = json.loads(line)[settings.text_field] if path.suffix == ".jsonl" else line
                if text.strip():
                    yield text.strip()


def _hub_documents(settings: CorpusSettings):
    from datasets import load_dataset

    rows = load_dataset(settings.hub_path, settings.hub_name, split=settings.hub_split, streaming=True)
    for row in rows:
        if row[settings.text_field].strip():
            yield row[settings.text_field].strip()


def _generated_documents(model, tokenizer, settings: CorpusSettings):
    """Endless seeded documents written by the model, a batch at a time."""
    rng = random.Random(settings.seed)
    while True:
        prompts = [rng.choice(STYLES).format(rng.choice(TOPICS)) for _ in range(settings.batch_size)]
        if tokenizer.chat_template:
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        torch.manual_seed(rng.randrange(2**31))
        with torch.inference_mode():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            yield tokenizer.decode(row, skip_special_tokens=True).strip()


def build_corpus(
    model_spec: str, settings: CorpusSettings, device: str = "auto"
) -> tuple[dict[str, torch.Tensor], dict]:
    """The blocks of every split, and a summary (documents and tokens used, sample texts)."""
    if settings.source == "generate":
        model, tokenizer = load_model(model_spec, device=resolve_device(device))
        remove_plan(model)  # the original writes the corpus, even for a saved CQIL model
        texts = _generated_documents(model, tokenizer, settings)
    else:
        tokenizer = load_tokenizer(model_spec)
        texts = _file_documents(settings) if settings.source == "files" else _hub_documents(settings)
    packer = Packer(settings, token_dtype(max(tokenizer.get_vocab().values()) + 1))
    needed = sum(settings.blocks.values()) * settings.block_size
    documents, samples, have = 0, [], 0
    with tqdm(total=needed, desc=f"corpus ({settings.source})", unit="tok") as bar:
        for text in texts:
            ids = tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
            documents, have = documents + 1, have + len(ids)
            samples += [text[:400]] if len(samples) < 3 else []
            bar.update(packer.add(ids))
            if packer.full:
                break
    if not packer.full:
        raise CqilError(
            f"corpus: the {settings.source} source gave {documents} documents, {have} tokens; "
            f"the blocks need {needed} tokens of whole documents"
        )
    blocks = {s: torch.from_numpy(b) for s, b in packer.blocks.items()}
    summary = {
        "documents": documents,
        "tokens": {s: blocks[s].numel() for s in SPLITS},
        "blocks": {s: len(blocks[s]) for s in SPLITS},
        "samples": samples,
    }
    return blocks, summary


def run_corpus(settings: CorpusSettings, *, model: str, out, summary, device: str = "auto") -> None:
    """The stage: build the corpus of `model`, write its blocks (a torch file) and a summary JSON with provenance.

    `device` is where a `generate` source's model writes the text (auto: the job's GPU, else the CPU)."""
    blocks, found = build_corpus(model, settings, device)
    with atomic(out) as tmp:
        torch.save(blocks, tmp)
    write_json(summary, found | {"provenance": provenance({"model": model, "settings": asdict(settings)})})


def open_split(corpus, split: str) -> torch.Tensor:
    """One split's blocks (B, T) of a corpus file written by `run_corpus`, as stored (uint16 or int32) and
    memory-mapped: no copy is read until a batch is indexed, so take `.long()` of each batch."""
    if split not in SPLITS:
        raise CqilError(f"split {split!r}: allowed are {', '.join(SPLITS)}")
    if not Path(corpus).is_file():
        raise CqilError(f"--corpus {str(corpus)!r}: file not found (run `cqil corpus` first)")
    return torch.load(corpus, mmap=True)[split]


def load_split(corpus, split: str) -> torch.Tensor:
    """One split's blocks (B, T) as a LongTensor: the model's input ids. Only this split is read."""
    return open_split(corpus, split).long()
