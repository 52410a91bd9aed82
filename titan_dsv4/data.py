"""The embedded default dataset: original English prose shipped with the package (no network needed)."""

from __future__ import annotations

import json
from pathlib import Path

from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
CORPUS = {
    "dsv4_corpus": ASSETS / "corpus" / "train.jsonl",
    "dsv4_corpus_validation": ASSETS / "corpus" / "validation.jsonl",
}


def load_jsonl(path: str):
    """A map-style HF Dataset of ``{"text": ...}`` rows from a local JSON Lines file."""
    from datasets import Dataset

    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows or any("text" not in r for r in rows):
        raise ValueError(f"{path} must hold JSON lines with a 'text' field")
    return Dataset.from_list(rows)


def _text(sample: dict) -> str:
    return sample["text"]


def register_datasets() -> None:
    """Make ``--training.dataset dsv4_corpus`` (and ``dsv4_corpus_validation``) selectable: an entry in
    Titan's dataset table (its documented extension point), made by the spec's data builders."""
    for name, path in CORPUS.items():
        DATASETS[name] = DatasetConfig(path=str(path), loader=load_jsonl, sample_processor=_text)
