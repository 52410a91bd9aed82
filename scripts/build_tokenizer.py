#!/usr/bin/env python
"""Build the embedded byte-level BPE tokenizer for titan_dsv4.

Trains a byte-level BPE tokenizer (HF ``tokenizers``) on the embedded corpus
``titan_dsv4/assets/corpus/train.jsonl`` and writes ``tokenizer.json`` and
``tokenizer_config.json`` to ``titan_dsv4/assets/tokenizer/`` in the layout
expected by TorchTitan's ``HuggingFaceTokenizer``.

The build is deterministic: documents are read in file order, training runs
single-threaded, and the outputs are byte-identical between runs.

Usage:
    python scripts/build_tokenizer.py [--corpus PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Single-threaded training for reproducibility; must be set before importing tokenizers.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["RAYON_RS_NUM_CPUS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "titan_dsv4" / "assets" / "corpus" / "train.jsonl"
DEFAULT_OUT = REPO_ROOT / "titan_dsv4" / "assets" / "tokenizer"

VOCAB_SIZE = 2048
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]  # ids 0, 1, 2
MIN_FREQUENCY = 2


def read_texts(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                texts.append(json.loads(line)["text"])
    if not texts:
        raise ValueError(f"no documents found in {path}")
    return texts


def build(corpus: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # ByteLevel post-processor only fixes offsets; it never adds BOS/EOS, so
    # TorchTitan's HuggingFaceTokenizer adds them itself (hf_adds_bos/eos False).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=MIN_FREQUENCY,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_texts(corpus), trainer=trainer)

    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def tokenizer_config() -> dict:
    def added(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    return {
        "add_bos_token": True,
        "add_eos_token": True,
        "added_tokens_decoder": {str(i): added(t) for i, t in enumerate(SPECIAL_TOKENS)},
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": 1000000000,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    tok = build(args.corpus)
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"), pretty=True)
    with open(args.out / "tokenizer_config.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(tokenizer_config(), f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.out} (vocab_size={tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
