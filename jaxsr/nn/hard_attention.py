"""Argmax ("hard", one-hot) attention: each query takes one key's value instead of a
softmax blend. CoSeR's reference attention (`attn4_ref_lna`) is built on it.

Two selections, both on logits s_ij = q_i·k_j · scale per head:

  "released"  out_i = s_ij* · v_j*, j* = argmax_j s_ij (first maximum on ties). No
              softmax: the chosen value is scaled by the raw maximum logit, as CoSeR's
              released code does. Gradients reach q_i and k_j* through s_ij*, and v_j*;
              nothing reaches the keys that were not chosen.
  "paper"     out_i = v_j* in the forward pass, with the gradient of softmax attention
              (straight-through estimator: weights = onehot + p − stop_gradient(p),
              p = softmax_j s_ij). The forward is the paper's one-hot selection of the
              most relevant reference token; the backward lets every key learn how it
              ranks, which the plain argmax cannot.

Query sequences of `MIN_CHUNKED_Q_LEN` tokens or more run in chunks of `Q_CHUNK`
rows of every head (`lax.map`), so the [chunk, Lk] logits stay small: CoSeR's
64×64-token reference attention would otherwise hold 4096² logits per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsr.nn.attention import Q_CHUNK

MIN_CHUNKED_Q_LEN = 1024

SELECTIONS = ("released", "paper")


def _released(s, vt):
    """s [B, H, c, Lk] float32 logits, vt [B, H, Lk, D] -> [B, H, c, D]."""
    idx = jnp.argmax(s, axis=-1)[..., None]                  # first max on ties
    # take_along_axis (not jnp.max): the gradient goes to the chosen logit only, as
    # with torch.max(dim=...), even when two logits tie.
    s_max = jnp.take_along_axis(s, idx, axis=-1)             # [B, H, c, 1]
    v_sel = jnp.take_along_axis(vt, idx, axis=2)             # [B, H, c, D]
    return (s_max * v_sel.astype(jnp.float32)).astype(vt.dtype)


def _paper(s, vt):
    """Straight-through one-hot selection (see module docstring)."""
    p = jax.nn.softmax(s, axis=-1)
    onehot = jax.nn.one_hot(jnp.argmax(s, axis=-1), s.shape[-1], dtype=p.dtype)
    weights = onehot + p - jax.lax.stop_gradient(p)          # == onehot in value
    return jnp.matmul(weights.astype(vt.dtype), vt, preferred_element_type=jnp.float32
                      ).astype(vt.dtype)


def argmax_attention(q, k, v, *, selection: str = "released", scale=None,
                     chunk: int = Q_CHUNK):
    """Per-head argmax attention.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      selection: "released" or "paper" (module docstring).
      scale: logit scale, default D**-0.5.
      chunk: query rows per step when Lq >= MIN_CHUNKED_Q_LEN.
    Returns:
      [B, Lq, H, D] in v's dtype.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown argmax selection {selection!r}; choose one of {SELECTIONS}")
    select = _released if selection == "released" else _paper
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, lq, h, d = q.shape
    kt = jnp.transpose(k, (0, 2, 3, 1))                      # [B, H, D, Lk]
    vt = jnp.transpose(v, (0, 2, 1, 3))                      # [B, H, Lk, D]

    def one_chunk(qc):                                       # [B, H, c, D] -> [B, H, c, D]
        s = jnp.matmul(qc, kt, preferred_element_type=jnp.float32) * scale
        return select(s, vt)

    qt = jnp.transpose(q, (0, 2, 1, 3))                      # [B, H, Lq, D]
    if lq < MIN_CHUNKED_Q_LEN:
        return jnp.transpose(one_chunk(qt), (0, 2, 1, 3))
    pad = -lq % chunk
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, pad), (0, 0)))
    qt = jnp.moveaxis(qt.reshape(b, h, (lq + pad) // chunk, chunk, d), 2, 0)
    out = jax.lax.map(one_chunk, qt)                         # [n, B, H, c, D]
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, lq + pad, d)[:, :, :lq]
    return jnp.transpose(out, (0, 2, 1, 3))
