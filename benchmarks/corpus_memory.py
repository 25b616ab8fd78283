"""Peak host memory per token of the corpus stage, on a synthetic word stream (no model weights, no network).

    python benchmarks/corpus_memory.py [--tokens 4000000 16000000] [--vocab 32000] [--out results/benchmarks]

Each size runs the stage's own command (`cqil corpus`, source=files, blocks of 2048 tokens) in a fresh
process and reads that process's peak resident set (ru_maxrss, from wait4). The slope between the smallest
and the largest size is the build's bytes per token; the fixed part (Python, torch, transformers) cancels
out. The slope is extrapolated to the paper's corpus (config/paper.yaml: 256,128 blocks of 2048 tokens).
Sizes of a few million tokens and more: below that, a compact build (2 bytes a token) stays under the
peak that the imports and the tokenizer reach before it starts, and the slope reads as noise.
The tokenizer is word-level over `--vocab` ids drawn uniformly, so each word is exactly one token and
almost every id is a Python int of its own, as with a real vocabulary (32000: LLaMA; 152064: Qwen).
Writes results/benchmarks/corpus_memory.json.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from cqil.io import provenance, write_json

BLOCK = 2048
PAPER_TOKENS = (32 + 32 + 256000 + 64) * BLOCK


def model_dir(path: Path, vocab: int) -> Path:
    """A directory `load_tokenizer` accepts: a config and a word-level tokenizer over `vocab` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    tokenizer.save_pretrained(path)
    config = dict(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1)
    LlamaConfig(**config).save_pretrained(path)
    return path


def text_file(path: Path, tokens: int, vocab: int) -> Path:
    """Documents of 50-1000 words, one per line (WikiText's layout), enough for `tokens` whole-document blocks."""
    rng = random.Random(0)
    written = 0
    with open(path, "w") as f:
        while written < tokens + 4 * 1000:  # each split drops at most one document's tail
            n = rng.randint(50, 1000)
            f.write(" ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(n)) + "\n")
            written += n
    return path


def peak_bytes(tokens: int, model: Path, text: Path, work: Path) -> int:
    """The peak resident set of one `cqil corpus` run building `tokens` tokens."""
    blocks = {"calibration": 1, "search": 1, "finetune": tokens // BLOCK - 3, "test": 1}  # tokens: whole blocks
    settings = {"source": "files", "files": [str(text)], "block_size": BLOCK, "blocks": blocks}
    command = [sys.executable, "-m", "cqil", "corpus", "--settings", json.dumps(settings), "--model", str(model)]
    command += ["--out", str(work / "corpus.pt"), "--summary", str(work / "corpus.json")]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"cqil corpus failed: {child.stderr.read().strip().splitlines()[-1]}")
    return usage.ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4_000_000, 16_000_000])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    if len(args.tokens) < 2 or min(args.tokens) < 4 * BLOCK:
        raise SystemExit(f"--tokens: give two or more sizes, each at least {4 * BLOCK} (one block per split)")
    sizes = sorted(n // BLOCK * BLOCK for n in args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = model_dir(tmp / "model", args.vocab)
        text = text_file(tmp / "docs.txt", sizes[-1], args.vocab)
        runs = [{"tokens": n, "peak_bytes": peak_bytes(n, model, text, tmp)} for n in sizes]
    slope = (runs[-1]["peak_bytes"] - runs[0]["peak_bytes"]) / (sizes[-1] - sizes[0])
    fixed = runs[0]["peak_bytes"] - slope * sizes[0]
    record = {
        "vocab": args.vocab,
        "block_size": BLOCK,
        "runs": runs,
        "bytes_per_token": round(slope, 2),
        "fixed_bytes": round(fixed),
        "paper_tokens": PAPER_TOKENS,
        "paper_peak_gib": round((fixed + slope * PAPER_TOKENS) / 2**30, 2),
        "provenance": provenance(vars(args)),
    }
    write_json(Path(args.out) / "corpus_memory.json", record)
    print(json.dumps({k: v for k, v in record.items() if k != "provenance"}, indent=2))


if __name__ == "__main__":
    main()
