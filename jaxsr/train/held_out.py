"""Held-out photos for samples and evaluation during training (SeeSR and CoSeR).

A section of the config (config.samples, config.eval) names a folder of clean photos
(`source`), how many to use (`count`, sorted by name), the HR crop side (`size`) and a
`seed`. Each photo is centre-cropped and degraded once with the training degradation
from a fixed key (`held_out_pair`), so every step compares the same inputs.
config.eval adds `metrics` (jaxsr eval's names), `metric_weights` (a `jaxsr convert
--metric` folder; metrics that need weights are left out without one), `crop_border`
and `y_channel` (`held_out_metrics`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def held_out_pair(image: np.ndarray, size: int, preset: str, seed: int):
    """(LR uint8 [size/4]², HR uint8 [size]²): a centre crop of `image` and its degraded
    version, drawn with the training degradation from a fixed key."""
    from jaxsr.data.degrade import degrade_batch, preset_by_name

    h, w = image.shape[:2]
    if min(h, w) < size:
        raise ValueError(f"held-out image {w}x{h} is smaller than {size}")
    top, left = (h - size) // 2, (w - size) // 2
    hr = image[top:top + size, left:left + size]
    keys = jax.random.split(jax.random.key(seed), 1)   # [1] typed keys
    lr, _ = degrade_batch(keys, jnp.asarray(hr[None], jnp.float32) / 255.0,
                          preset_by_name(preset))
    lr = np.asarray(jnp.round(jnp.clip(lr[0], 0, 1) * 255)).astype(np.uint8)
    return lr, hr


def comparison_strip(lr: np.ndarray, sr: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """LR (nearest ×4) | SR | HR, with 4-pixel white gaps: uint8 [H, 3W + 8, 3]."""
    scale = hr.shape[0] // lr.shape[0]
    big = np.repeat(np.repeat(lr, scale, 0), scale, 1)
    gap = np.full((hr.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([big, gap, sr, gap, hr], axis=1)


def sample_photos(folder, count: int, field: str = "config.samples.source") -> list[Path]:
    """The first `count` images of `folder` by name; a clear error naming `field` when
    the folder is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{field} {folder} is not a folder of photos")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{field} {folder} holds no images")
    return files[:count]


def held_out_pairs(config, section: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (LR, HR) pairs of config.<section>, degraded with config.degradation."""
    from jaxsr.data.image_io import load_image

    cfg = config[section]
    photos = sample_photos(cfg.source, int(cfg.count), f"config.{section}.source")
    return [held_out_pair(load_image(p), int(cfg.size), config.degradation, int(cfg.seed))
            for p in photos]


def replicated(x: np.ndarray, sharding):
    """A host array (equal in every process) as a global array replicated on the mesh."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def held_out_metrics(config, note=print):
    """jaxsr.metrics.registry.HeldOutMetrics for config.eval."""
    from jaxsr.metrics.registry import HeldOutMetrics

    cfg = config.eval
    return HeldOutMetrics([n for n in str(cfg.metrics).split(",") if n.strip()],
                          cfg.get("metric_weights") or None,
                          crop_border=int(cfg.get("crop_border", 0)),
                          y_channel=bool(cfg.get("y_channel", False)), note=note)
