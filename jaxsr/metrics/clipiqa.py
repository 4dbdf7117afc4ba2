"""CLIPIQA (Wang, Chan and Loy, AAAI 2023) as pyiqa 0.1.16 computes its default
`clipiqa` metric (`pyiqa/archs/clipiqa_arch.py`, model_type "clipiqa", backbone RN50,
pos_embedding False): a no-reference score in [0, 1], higher is better.

For images x in [0, 1]:
    x' = (x - CLIP mean) / CLIP std           no resize: the image enters at its size
    f  = RN50 image tower (x'), L2-normalised
    t_k = CLIP text feature of prompt k (EOT token after ln_final, @ text_projection),
          L2-normalised; prompts in antonym pairs (good_j, bad_j)
    logits_k = exp(logit_scale) * f . t_k     exp(logit_scale) = 100 in the release
    score = mean over pairs j of softmax(logits_good_j, logits_bad_j)[good]

The text features depend on the weights only, so `jaxsr.convert.metric_clipiqa`
computes them once, with `jaxsr.models.clip_text` on the converted text weights, and
`params` holds just the image tower, the normalised text features and logit_scale.

pyiqa's CLIPIQA against the CLIP-IQA paper's code (github.com/IceClear/CLIP-IQA):
  - Prompts: pyiqa ensembles five pairs, PROMPT_PAIRS below ("Good image" / "bad image",
    sharp / blurry image, sharp / blurry edges, high / low resolution image, noise-free
    / noisy image) and averages their "good" probabilities; the paper's quality score
    uses the single pair "Good photo." / "Bad photo.".
  - Image tower: the same copy of OpenAI's model code in both, with the same switch
    that skips the attention pool's positional embedding (pyiqa's default,
    `pos_embedding=False`, kept here; OpenAI's original always adds it, fixing the input
    to 224x224).
  - Input: pyiqa scores the whole image, not resized or cropped, normalised with
    OpenAI CLIP's mean/std inside the metric (so does `clipiqa` here).
  - The result is returned per image, (B,) here, (B, 1) in pyiqa.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsr.metrics.clip_resnet import ModifiedResNet, config_from_params

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# pyiqa's prompts, in its order: (good, bad) for each pair.
PROMPT_PAIRS = (
    ("Good image", "bad image"),
    ("Sharp image", "blurry image"),
    ("sharp edges", "blurry edges"),
    ("High resolution image", "low resolution image"),
    ("Noise-free image", "noisy image"),
)


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x|| over the last axis (no epsilon, as CLIP's forward has it)."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def image_features(params, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) RGB in [0, 1] -> (B, output_dim) image-tower output, not normalised."""
    if images.shape[1] < 32 or images.shape[2] < 32:
        raise ValueError(f"CLIPIQA needs images of at least 32x32 pixels (the image tower "
                         f"reduces them 32 times), got {images.shape}")
    x = (jnp.asarray(images, jnp.float32) - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
    visual = params["visual"]
    return ModifiedResNet(config_from_params(visual)).apply({"params": visual}, x)


def pair_logits(params, features: jax.Array) -> jax.Array:
    """Image features (B, D) -> logits (B, pairs, 2), [..., 0] the good prompt."""
    text = params["text_features"]                   # (2 * pairs, D), unit rows
    cosine = jnp.matmul(l2_normalize(features), text.T, precision=jax.lax.Precision.HIGHEST)
    logits = jnp.exp(params["logit_scale"]) * cosine
    return logits.reshape(features.shape[0], -1, 2)


def scores_from_features(params, features: jax.Array) -> jax.Array:
    """Image features (B, D), not normalised -> (B,) CLIPIQA scores."""
    probs = jax.nn.softmax(pair_logits(params, features), axis=-1)
    return probs[..., 0].mean(axis=1)


def clipiqa(params, images: jax.Array) -> jax.Array:
    """Per-image CLIPIQA.

    Args:
      params: from `jaxsr.convert.metric_clipiqa.convert`: {"visual": image tower,
        "text_features": (2 * pairs, D) unit rows, good/bad alternating,
        "logit_scale": ()}.
      images: (B, H, W, 3) float32 RGB in [0, 1], H and W at least 32.
    Returns:
      (B,) float32 in [0, 1], higher is better.
    """
    return scores_from_features(params, image_features(params, images))
