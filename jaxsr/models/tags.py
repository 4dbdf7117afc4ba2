"""RAM's tag vocabulary and the hard prompt: which tags DAPE's logits predict.

A tag c fires when sigmoid(logit_c) > threshold_c (strict), with both sides in
float32 as in the original (torch float32 sigmoid vs a float32 threshold tensor).
Float32 matters at the top: sigmoid saturates to exactly 1.0 for logits above ≈17,
so the 10 classes whose threshold is 1.0 can never fire, however large the logit.
Tags are listed in tag-list order and joined with ", " (SeeSR's separator; RAM
itself uses " | ").

The vocabulary (4585 English tag names) and the per-class thresholds ship in
`jaxsr/assets/ram/` (copies of RAM's `ram_tag_list.txt` and
`ram_tag_list_threshold.txt`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

TAG_LIST_FILE = "ram_tag_list.txt"
THRESHOLD_FILE = "ram_tag_list_threshold.txt"
SEPARATOR = ", "


def _read_text(path, default_name: str) -> str:
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    return resources.files("jaxsr").joinpath("assets", "ram", default_name).read_text(
        encoding="utf-8")


def load_tag_list(path=None) -> list[str]:
    """Tag names, one per line (the file's last line has no newline)."""
    return _read_text(path, TAG_LIST_FILE).splitlines()


def load_thresholds(path=None) -> np.ndarray:
    """Per-class thresholds [C] float32 (the dtype of the original's threshold tensor)."""
    lines = _read_text(path, THRESHOLD_FILE).splitlines()
    return np.asarray([float(s.strip()) for s in lines if s.strip()], np.float32)


def tag_probabilities(logits) -> np.ndarray:
    """sigmoid(logits) rounded to float32: evaluated in float64 (numerically stable
    for both signs) and rounded once, so it saturates to 1.0 exactly like float32."""
    x = np.asarray(logits, np.float64)
    e = np.exp(-np.abs(x))
    p = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return p.astype(np.float32)


def predicted_tags(logits, thresholds) -> np.ndarray:
    """[B, C] bool: sigmoid(logit) > threshold, compared in float32."""
    thresholds = np.asarray(thresholds, np.float32)
    probs = tag_probabilities(logits)
    if probs.shape[-1] != thresholds.shape[-1]:
        raise ValueError(f"{probs.shape[-1]} logits per image but {thresholds.shape[-1]} "
                         "thresholds")
    return probs > thresholds


def hard_prompt(logits, tags: list[str], thresholds) -> list[str]:
    """Tag strings of a batch: logits [B, C] -> B strings "tag_a, tag_b, ..." ("" if none)."""
    fired = predicted_tags(np.atleast_2d(np.asarray(logits)), thresholds)
    if fired.shape[-1] != len(tags):
        raise ValueError(f"{fired.shape[-1]} classes but {len(tags)} tag names")
    return [SEPARATOR.join(tags[i] for i in np.flatnonzero(row)) for row in fired]
