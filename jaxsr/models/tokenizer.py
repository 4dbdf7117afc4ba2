"""The CLIP tokenizer (transformers, no torch): prompts → int32 ids [B, 77]."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_FILES = ("vocab.json", "merges.txt")


def load_tokenizer(path):
    """A diffusers `tokenizer/` folder (vocab.json + merges.txt) → CLIPTokenizer."""
    from transformers import CLIPTokenizer

    path = Path(path)
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer folder {path} lacks {', '.join(missing)}")
    return CLIPTokenizer.from_pretrained(str(path))


def tokenize(tokenizer, prompts: list[str], max_length: int = 77) -> np.ndarray:
    """Pad to `max_length` and truncate, as the SD pipelines do: [len(prompts), max_length]."""
    out = tokenizer(list(prompts), padding="max_length", max_length=max_length,
                    truncation=True, return_tensors="np")
    return out["input_ids"].astype(np.int32)
