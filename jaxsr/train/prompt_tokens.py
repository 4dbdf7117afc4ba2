"""Tag prompts as token ids on the device, so training needs no host round trip.

SeeSR trains with the text "tag_a, tag_b, ..." of the tags the frozen tagger finds
on the clean image. The CLIP tokenizer splits text into words and punctuation before
BPE, and BPE never crosses those boundaries, so the ids of "a, b" are exactly
ids(a) + ids(",") + ids(b). A table of every tag's ids, built once on the host, then
turns a [B, C] mask of fired tags into [B, 77] ids with a cumulative sum and a
scatter, inside jit:

    table = TagTokenTable.build(tokenizer, tags)
    ids = prompt_ids(table, fired)      # == tokenize(tokenizer, [", ".join(...)])

Truncation matches the tokenizer's: start token, at most 75 text tokens, end token,
then padding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxsr.models.tags import SEPARATOR


class TagTokenTable(NamedTuple):
    ids: np.ndarray          # [C, T] int32, each tag's token ids, zero-padded
    lengths: np.ndarray      # [C] int32
    separator: np.ndarray    # [S] int32, the ids of SEPARATOR (", " -> [","])
    bos: int
    eos: int
    pad: int
    max_length: int

    @classmethod
    def build(cls, tokenizer, tags: list[str], max_length: int = 77) -> TagTokenTable:
        def ids_of(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        per_tag = [ids_of(t) for t in tags]
        if any(not ids for ids in per_tag):
            empty = [t for t, ids in zip(tags, per_tag) if not ids]
            raise ValueError(f"tags with no tokens: {empty[:5]}")
        width = max(len(ids) for ids in per_tag)
        table = np.zeros((len(tags), width), np.int32)
        for i, ids in enumerate(per_tag):
            table[i, :len(ids)] = ids
        pad = tokenizer.pad_token_id
        return cls(ids=table, lengths=np.asarray([len(i) for i in per_tag], np.int32),
                   separator=np.asarray(ids_of(SEPARATOR), np.int32),
                   bos=int(tokenizer.bos_token_id), eos=int(tokenizer.eos_token_id),
                   pad=int(tokenizer.eos_token_id if pad is None else pad),
                   max_length=max_length)


def prompt_ids(table: TagTokenTable, fired):
    """fired: bool [B, C] -> int32 [B, max_length], the ids of the ", "-joined tags in
    tag-list order (an empty prompt when none fired)."""
    fired = jnp.asarray(fired, bool)
    b, c = fired.shape
    ids, lengths = jnp.asarray(table.ids), jnp.asarray(table.lengths)
    sep = jnp.asarray(table.separator)
    n_sep, width = sep.shape[0], ids.shape[1]
    room = table.max_length - 2                       # between the start and end tokens

    # Each fired tag takes its tokens plus a separator; the last separator is dropped.
    span = jnp.where(fired, lengths[None] + n_sep, 0)                  # [B, C]
    start = jnp.cumsum(span, axis=1) - span                           # exclusive
    total = jnp.maximum(span.sum(axis=1) - n_sep, 0)                  # [B] text tokens

    def scatter(out, pos, values, keep):
        # Positions past the text or the room are sent out of range and dropped.
        limit = jnp.minimum(total, room)[:, None, None]
        pos = jnp.where(keep & (pos < limit), pos + 1, table.max_length)
        rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], pos.shape)
        return out.at[rows, pos].set(jnp.broadcast_to(values, pos.shape), mode="drop")

    out = jnp.full((b, table.max_length), table.pad, jnp.int32)
    out = out.at[:, 0].set(table.bos)
    j = jnp.arange(width)[None, None]                                 # [1, 1, T]
    out = scatter(out, start[..., None] + j, ids[None],
                  fired[..., None] & (j < lengths[None, :, None]))
    k = jnp.arange(n_sep)[None, None]
    out = scatter(out, start[..., None] + lengths[None, :, None] + k, sep[None, None],
                  jnp.broadcast_to(fired[..., None], (b, c, n_sep)))
    end = jnp.minimum(total, room) + 1
    return out.at[jnp.arange(b), end].set(table.eos)
