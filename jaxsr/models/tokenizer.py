"""The CLIP tokenizer for SD text prompts: transformers' CLIPTokenizer (needs no
torch), used as the diffusers pipelines use it.

    prompts [B] str -> input_ids [B, 77] int32
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REQUIRED_FILES = ("vocab.json", "merges.txt")
FAST_TOKENIZER_FILE = "tokenizer.json"
SD_MAX_LENGTH = 77


def load_tokenizer(path):
    """A diffusers `tokenizer/` folder -> transformers CLIPTokenizer.

    The folder needs vocab.json and merges.txt, or a tokenizers-library
    tokenizer.json (what transformers 5 saves); special_tokens_map.json and
    tokenizer_config.json are honoured when present (SD2's pads with "!", id 0,
    where OpenAI CLIP's pads with <|endoftext|>).
    Raises: FileNotFoundError naming the folder and the files it lacks.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist (it should hold "
                                f"{' and '.join(REQUIRED_FILES)})")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing and not (path / FAST_TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"tokenizer folder {path} lacks {', '.join(missing)}")
    return CLIPTokenizer.from_pretrained(str(path))


def tokenize(tokenizer, prompts: list[str] | str, max_length: int = SD_MAX_LENGTH) -> np.ndarray:
    """Token ids padded to `max_length` and truncated (the end token kept), as the
    SD pipelines tokenize: [len(prompts), max_length] int32."""
    if isinstance(prompts, str):   # one prompt, not a list of its characters
        prompts = [prompts]
    out = tokenizer(list(prompts), padding="max_length", max_length=max_length,
                    truncation=True, return_tensors="np")
    return np.asarray(out["input_ids"], dtype=np.int32)
