"""SeeSR's tiled VAE (utils/vaehook.py) as a jit-able two-level computation.

For large images SeeSR hooks `vae.encoder` / `vae.decoder` (not quant_conv /
post_quant_conv) and runs them tile by tile. That changes the numbers, so a
faithful port must reproduce it:

- active only when max(H, W) > tile + 2·pad of the hooked module's input:
  encoder tile 1024 px with pad 32, decoder tile 224 latent with pad 11;
  otherwise the stock module runs;
- n = max(ceil((size − 2·pad)/tile), 1) tiles per axis, of
  ceil((size − 2·pad)/n) rounded up to a multiple of 32 (else 16, 8, 4, 2)
  when that stays ≤ tile (`best_tile_size`);
- tile i covers [pad + i·t, min(pad + (i+1)·t, size)], extended to the border
  for the first/last tile when writing the output, and read with `pad` extra
  context on each side (clipped to the image);
- every GroupNorm uses statistics shared by all tiles: the per-tile biased
  mean and variance (per sample and group), averaged with weights
  proportional to the tiles' pixel counts at that layer. This is the
  reference's approximation, reproduced as is: it ignores the spread of the
  tile means (so the variance is underestimated) and counts pixels in the
  overlapping context twice;
- everything else (convs with their zero padding at tile edges, up/down
  sampling, and the mid-block self-attention) runs per tile;
- each tile's output is cropped to its valid box and pasted.

Design. The encoder/decoder is flattened into a list of layer operations that
use the *same* Flax layers and parameters as `jaxsr.models.vae`, and cut at
every GroupNorm (22 in SD's encoder, 30 in its decoder) into segments. Segment
k runs on every tile (apply norm k with the shared statistics, then the local
ops up to the next norm, then that norm's per-tile statistics); the statistics
are combined; segment k+1 follows. Tile boxes are static Python; the tiles of
each shape run one after another in a `fori_loop` (see `run_tiled`).

Memory bound. Between segments every tile's activation and pending residual
must be kept (the reference keeps them in host RAM). They live in two
in-place arenas of n_tiles rows, each row as large as the largest per-tile
activation (resp. residual) anywhere in the network, so peak memory is about
  n_tiles·(max tile activation + max tile residual) + one tile's working set,
i.e. ≈ (1 + 2·pad/t)²·(widest + widest residual full-image activation) plus the
convs of one tile (the mid-block attention of a tile is computed in query
chunks by `dot_product_attention`). Measured from the compiled SD2 VAE
(float32, XLA memory analysis): encoder at 2048² px 8.0 GiB temp (untiled
6.1 GiB), decoder at 256² latent 15.4 GiB (untiled 14.0 GiB). Tiling in JAX is
therefore about reproducing the reference's numbers on large images, not about
saving memory: our untiled VAE already never forms a quadratic attention
matrix. (Offloading the arenas to host memory would be the next step if
memory mattered.)

Precision: tiles compute and store in the VAE's `dtype` throughout, as the
reference's hook does. Under bfloat16 this therefore does not follow the untiled
VAE's float32 activations between convolutions (jaxsr.models.vae); the pipelines
run the VAE in float32, where the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.models.vae import AutoencoderKL, DiagonalGaussian
from jaxsr.nn.attention import dot_product_attention
from jaxsr.nn.layers import conv
from jaxsr.nn.moments import group_moments
from jaxsr.nn.resnet import Downsample2D, Upsample2D

ENCODER_TILE = 1024  # pixels (test_seesr.py --vae_encoder_tiled_size)
DECODER_TILE = 224   # latent pixels (--vae_decoder_tiled_size)
ENCODER_PAD = 32
DECODER_PAD = 11
_EPS = 1e-6          # the VAE's GroupNorm epsilon, also used by the synchronised norm


# ---------------------------------------------------------------------------- tile boxes


class Box(NamedTuple):
    """Half-open rows [y0, y1) × columns [x0, x1)."""

    y0: int
    y1: int
    x0: int
    x1: int


class Tile(NamedTuple):
    """One tile: the input region read (with context) and the output region it writes."""

    read: Box   # in input coordinates
    write: Box  # in output coordinates


def needs_tiling(h: int, w: int, tile: int, pad: int) -> bool:
    """The hook's switch: tile only when the longer side exceeds tile + 2·pad."""
    return max(h, w) > tile + 2 * pad


def best_tile_size(lower: int, upper: int) -> int:
    """Round `lower` up to a multiple of 32 (else 16, 8, 4, 2) without exceeding `upper`."""
    divider = 32
    while divider >= 2:
        rem = lower % divider
        if rem == 0:
            return lower
        if lower - rem + divider <= upper:
            return lower - rem + divider
        divider //= 2
    return lower


def split_tiles(h: int, w: int, tile: int, pad: int, scale: int, upsamples: bool) -> list[Tile]:
    """The hook's tiles for an h×w input, row-major. Output coordinates are input·scale
    for the decoder (`upsamples`) and input // scale for the encoder."""
    n_h = max(math.ceil((h - 2 * pad) / tile), 1)
    n_w = max(math.ceil((w - 2 * pad) / tile), 1)
    t_h = best_tile_size(math.ceil((h - 2 * pad) / n_h), tile)
    t_w = best_tile_size(math.ceil((w - 2 * pad) / n_w), tile)
    to_out = (lambda v: v * scale) if upsamples else (lambda v: v // scale)
    tiles = []
    for i in range(n_h):
        for j in range(n_w):
            y0, y1 = pad + i * t_h, min(pad + (i + 1) * t_h, h)
            x0, x1 = pad + j * t_w, min(pad + (j + 1) * t_w, w)
            write = Box(y0 if y0 > pad else 0, y1 if y1 < h - pad else h,
                        x0 if x0 > pad else 0, x1 if x1 < w - pad else w)
            tiles.append(Tile(
                read=Box(max(0, y0 - pad), min(h, y1 + pad), max(0, x0 - pad), min(w, x1 + pad)),
                write=Box(*(to_out(v) for v in write)),
            ))
    return tiles


def _valid_crop(tile: Tile, out_hw: tuple[int, int], scale: int, upsamples: bool):
    """Slices of a tile's output that land in `tile.write` (the reference's margin rule)."""
    to_out = (lambda v: v * scale) if upsamples else (lambda v: v // scale)
    read = Box(*(to_out(v) for v in tile.read))
    top, bottom = tile.write.y0 - read.y0, tile.write.y1 - read.y1
    left, right = tile.write.x0 - read.x0, tile.write.x1 - read.x1
    rows = slice(top, out_hw[0] + bottom)
    cols = slice(left, out_hw[1] + right)
    got = (len(range(*rows.indices(out_hw[0]))), len(range(*cols.indices(out_hw[1]))))
    want = (tile.write.y1 - tile.write.y0, tile.write.x1 - tile.write.x0)
    if got != want:
        raise ValueError(f"tiled VAE: tile {tile} gives a {got} crop for a {want} box")
    return rows, cols


# ------------------------------------------------------------- the network as a flat op list


class Op(NamedTuple):
    """kind: "local" (fn(x)), "store" (res = fn(x)), "add" (x = x + res) or "norm"
    (synchronised GroupNorm with params `norm`)."""

    kind: str
    fn: Callable | None = None
    norm: dict | None = None


def _conv_op(p, dtype, **kw):
    module = conv(p["kernel"].shape[-1], "conv", dtype=dtype, **kw)
    return Op("local", lambda x: module.apply({"params": p}, x))


def _resnet_ops(p, dtype) -> list[Op]:
    """ResnetBlock2D (no time embedding) as the hook splits it."""
    if "conv_shortcut" in p:
        shortcut = conv(p["conv_shortcut"]["kernel"].shape[-1], "conv_shortcut", kernel=1,
                        padding=0, dtype=dtype)
        store = Op("store", lambda x: shortcut.apply({"params": p["conv_shortcut"]}, x))
    else:
        store = Op("store", lambda x: x)
    return [store,
            Op("norm", norm=p["norm1"]), Op("local", nn.silu), _conv_op(p["conv1"], dtype),
            Op("norm", norm=p["norm2"]), Op("local", nn.silu), _conv_op(p["conv2"], dtype),
            Op("add")]


def _attention_ops(p, dtype, backend) -> list[Op]:
    """The VAE mid-block attention: residual, synchronised norm, single-head attention
    over the tile's pixels only, output projection."""

    def attend(y):
        b, h, w, c = y.shape
        seq = y.reshape(b, h * w, c)
        dense = lambda name, v: nn.Dense(c, dtype=dtype).apply({"params": p[name]}, v)
        q, k, v = (dense(n, seq).reshape(b, h * w, 1, c) for n in ("to_q", "to_k", "to_v"))
        out = dot_product_attention(q, k, v, backend=backend).reshape(b, h * w, c)
        return dense("to_out_0", out).reshape(b, h, w, c)

    return [Op("store", lambda x: x), Op("norm", norm=p["group_norm"]), Op("local", attend),
            Op("add")]


def _mid_ops(p, dtype, backend) -> list[Op]:
    return (_resnet_ops(p["resnets_0"], dtype) + _attention_ops(p["attentions_0"], dtype, backend)
            + _resnet_ops(p["resnets_1"], dtype))


def _tail_ops(p, dtype) -> list[Op]:
    return [Op("norm", norm=p["conv_norm_out"]), Op("local", nn.silu),
            _conv_op(p["conv_out"], dtype)]


def encoder_ops(vae: AutoencoderKL, p) -> list[Op]:
    """`Encoder.__call__` of jaxsr.models.vae as ops; p = params["encoder"]."""
    cfg, dt = vae.config, vae.dtype
    levels = len(cfg.block_out_channels)
    ops = [Op("local", lambda x: x.astype(dt)), _conv_op(p["conv_in"], dt)]
    for i, ch in enumerate(cfg.block_out_channels):
        blk = p[f"down_blocks_{i}"]
        for j in range(cfg.layers_per_block):
            ops += _resnet_ops(blk[f"resnets_{j}"], dt)
        if i < levels - 1:
            down = Downsample2D(ch, asymmetric_pad=True, dtype=dt)
            ops.append(Op("local", lambda x, m=down, q=blk["downsamplers_0"]:
                          m.apply({"params": q}, x)))
    return ops + _mid_ops(p["mid_block"], dt, vae.attention) + _tail_ops(p, dt)


def decoder_ops(vae: AutoencoderKL, p) -> list[Op]:
    """`Decoder.__call__` of jaxsr.models.vae as ops; p = params["decoder"]."""
    cfg, dt = vae.config, vae.dtype
    chans = cfg.block_out_channels[::-1]
    ops = [Op("local", lambda x: x.astype(dt)), _conv_op(p["conv_in"], dt)]
    ops += _mid_ops(p["mid_block"], dt, vae.attention)
    for i, ch in enumerate(chans):
        blk = p[f"up_blocks_{i}"]
        for j in range(cfg.layers_per_block + 1):
            ops += _resnet_ops(blk[f"resnets_{j}"], dt)
        if i < len(chans) - 1:
            up = Upsample2D(ch, dtype=dt)
            ops.append(Op("local", lambda x, m=up, q=blk["upsamplers_0"]:
                          m.apply({"params": q}, x)))
    return ops + _tail_ops(p, dt)


# -------------------------------------------------------------- synchronised group norm


def normalize_with_stats(x, mean, var, p, groups: int, dtype, eps: float = _EPS):
    """GroupNorm of x [B, H, W, C] with given [B, G] statistics and affine params p."""
    xf = x.astype(jnp.float32)
    g = xf.reshape(xf.shape[0], -1, groups, xf.shape[-1] // groups)
    y = (g - mean[:, None, :, None]) * jax.lax.rsqrt(var[:, None, :, None] + eps)
    return (y.reshape(xf.shape) * p["scale"] + p["bias"]).astype(dtype)


def pixel_weights(pixel_counts) -> np.ndarray:
    """The reference's tile weights: (n_i / max n) / Σ_j (n_j / max n), in float32."""
    n = np.asarray(pixel_counts, np.float32) / np.float32(max(pixel_counts))
    return (n / n.sum(dtype=np.float32)).astype(np.float32)


# ------------------------------------------------------------------------------ executor


class _Segment(NamedTuple):
    norm: Op | None   # the GroupNorm that opens the segment (None for the first)
    ops: list[Op]     # local / store / add ops up to the next norm
    collect: bool     # whether the next segment needs this one's output statistics


def _segments(ops: list[Op]) -> list[_Segment]:
    """Cut at each norm: (None, ops before the first norm), (norm_0, ops…), …"""
    cuts: list[tuple[Op | None, list[Op]]] = [(None, [])]
    for op in ops:
        if op.kind == "norm":
            cuts.append((op, []))
        else:
            cuts[-1][1].append(op)
    return [_Segment(n, o, k + 1 < len(cuts)) for k, (n, o) in enumerate(cuts)]


def _run_ops(ops: list[Op], x, res):
    for op in ops:
        if op.kind == "local":
            x = op.fn(x)
        elif op.kind == "store":
            res = op.fn(x)
        elif op.kind == "add":
            x, res = x + res, None
        else:
            raise AssertionError(op.kind)
    return x, res


def _run_segment(seg: _Segment, x, res, stats, groups, dtype):
    if seg.norm is not None:
        x = normalize_with_stats(x, stats[0], stats[1], seg.norm.norm, groups, dtype)
    return _run_ops(seg.ops, x, res)


def _trace_shapes(segs, tile_shape, groups, dtype):
    """Per segment boundary: (x, pending residual) ShapeDtypeStructs for one tile."""
    b = tile_shape[0]
    stats = (jax.ShapeDtypeStruct((b, groups), jnp.float32),) * 2
    x = jax.ShapeDtypeStruct(tile_shape, dtype)
    res = None
    shapes = [(x, res)]
    for seg in segs:
        x, res = jax.eval_shape(
            lambda x_, r_, s_, seg=seg: _run_segment(seg, x_, r_, s_, groups, dtype), x, res, stats)
        shapes.append((x, res))
    return shapes


def run_tiled(ops: list[Op], x, tiles: list[Tile], *, groups: int, scale: int, upsamples: bool,
              dtype):
    """Run the op list over `tiles` of x [B, H, W, C] with synchronised GroupNorms.

    Returns the pasted output [B, H', W', C'] (H' = H·scale or H // scale). Any
    static tile list works; one tile covering the whole input reproduces the
    untiled network (used by the tests to check the op lists).

    Storage: every tile's current activation lives in one row of an arena
    [B, n_tiles, max elements per sample], its pending residual in a second one.
    The batch stays the arenas' own leading axis so that a batch sharded over
    devices stays sharded: folded into the rows, it made the partitioner gather
    every image's tiles onto every device (the 2048² SeeSR sampling plan on
    v5p:2x2x1, one image per chip, compiled to 1.3 TB of all-gathers per step).
    Each segment is a `fori_loop` over the tiles of one shape that reads a tile's
    row, computes, and writes the row back in place; the arenas are the loop
    carries of all loops, so XLA keeps updating the same two buffers (separate
    `lax.map` outputs would each get a fresh buffer: measured, it grows with the
    ~30 segments).
    """
    b, h, w, _ = x.shape
    n = len(tiles)
    dtype = jnp.dtype(dtype)
    segs = _segments(ops)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tiles):
        by_shape.setdefault((t.read.y1 - t.read.y0, t.read.x1 - t.read.x0), []).append(i)
    shapes = {hw: _trace_shapes(segs, (b, *hw, x.shape[-1]), groups, dtype) for hw in by_shape}
    # Elements per sample of a tile's activation (every shape here leads with B).
    size = lambda sd: int(np.prod(sd.shape[1:])) if sd is not None else 0
    row = max(size(sx) for sh in shapes.values() for sx, _ in sh)
    res_row = max([1] + [size(sr) for sh in shapes.values() for _, sr in sh])

    arena = jnp.zeros((b, n, row), dtype)
    for i, t in enumerate(tiles):
        crop = x[:, t.read.y0:t.read.y1, t.read.x0:t.read.x1].astype(dtype)
        arena = arena.at[:, i, :crop[0].size].set(crop.reshape(b, -1))
    res_arena = jnp.zeros((b, n, res_row), dtype)
    stats = None

    for k, seg in enumerate(segs):
        uses_res = any(op.kind in ("store", "add") for op in seg.ops)
        tile_mean = jnp.zeros((n, b, groups), jnp.float32)
        tile_var = jnp.zeros((n, b, groups), jnp.float32)
        pixels = [0] * n
        for hw, idx in by_shape.items():
            (x_in, r_in), (x_out, _) = shapes[hw][k], shapes[hw][k + 1]
            order = jnp.asarray(idx, jnp.int32)

            def body(j, carry, seg=seg, x_in=x_in, r_in=r_in, order=order, stats=stats,
                     uses_res=uses_res):
                arena, res_arena, t_mean, t_var = carry
                i = order[j]
                tx = jax.lax.dynamic_slice(arena, (0, i, 0), (b, 1, size(x_in)))
                tx = tx.reshape(x_in.shape)
                res = None
                if uses_res and r_in is not None:
                    res = jax.lax.dynamic_slice(res_arena, (0, i, 0), (b, 1, size(r_in)))
                    res = res.reshape(r_in.shape)
                tx, res = _run_segment(seg, tx, res, stats, groups, dtype)
                arena = jax.lax.dynamic_update_slice(
                    arena, tx.reshape(b, 1, -1).astype(dtype), (0, i, 0))
                if uses_res and res is not None:
                    res_arena = jax.lax.dynamic_update_slice(
                        res_arena, res.reshape(b, 1, -1).astype(dtype), (0, i, 0))
                if seg.collect:
                    mean, var = group_moments(tx, groups)
                    t_mean = jax.lax.dynamic_update_slice(t_mean, mean[None], (i, 0, 0))
                    t_var = jax.lax.dynamic_update_slice(t_var, var[None], (i, 0, 0))
                return arena, res_arena, t_mean, t_var

            arena, res_arena, tile_mean, tile_var = jax.lax.fori_loop(
                0, len(idx), body, (arena, res_arena, tile_mean, tile_var))
            for i in idx:
                pixels[i] = x_out.shape[1] * x_out.shape[2]
        if seg.collect:
            wts = jnp.asarray(pixel_weights(pixels))[:, None, None]
            stats = (jnp.sum(tile_mean * wts, axis=0), jnp.sum(tile_var * wts, axis=0))

    channels = next(iter(shapes.values()))[-1][0].shape[-1]
    out_h, out_w = (h * scale, w * scale) if upsamples else (h // scale, w // scale)
    out = jnp.zeros((b, out_h, out_w, channels), dtype)
    for hw, idx in by_shape.items():
        final = shapes[hw][-1][0]
        for i in idx:
            wb = tiles[i].write
            if wb.y1 <= wb.y0 or wb.x1 <= wb.x0:
                continue  # a tile that only contributed statistics (possible for many tiles)
            rows, cols = _valid_crop(tiles[i], final.shape[1:3], scale, upsamples)
            tile_out = arena[:, i, :size(final)].reshape(final.shape)
            out = out.at[:, wb.y0:wb.y1, wb.x0:wb.x1].set(tile_out[:, rows, cols])
    return out


# ----------------------------------------------------------------------------- public API


def _scale(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tiled_encoder(vae: AutoencoderKL, params, x, *, tile: int = ENCODER_TILE,
                  pad: int = ENCODER_PAD):
    """vae.encoder(x) with the hook: x [B, H, W, 3] in [-1, 1] → moments [B, H/8, W/8, 2·zc]."""
    h, w = x.shape[1:3]
    if not needs_tiling(h, w, tile, pad):
        return vae.apply({"params": params}, x, method=lambda m, v: m.encoder(v))
    ops = encoder_ops(vae, params["encoder"])
    tiles = split_tiles(h, w, tile, pad, _scale(vae), upsamples=False)
    return run_tiled(ops, x, tiles, groups=vae.config.norm_num_groups, scale=_scale(vae),
                     upsamples=False, dtype=vae.dtype)


def tiled_decoder(vae: AutoencoderKL, params, z, *, tile: int = DECODER_TILE,
                  pad: int = DECODER_PAD):
    """vae.decoder(z) with the hook: z [B, h, w, zc] (after post_quant_conv) → [B, 8h, 8w, 3]."""
    h, w = z.shape[1:3]
    if not needs_tiling(h, w, tile, pad):
        return vae.apply({"params": params}, z, method=lambda m, v: m.decoder(v))
    ops = decoder_ops(vae, params["decoder"])
    tiles = split_tiles(h, w, tile, pad, _scale(vae), upsamples=True)
    return run_tiled(ops, z, tiles, groups=vae.config.norm_num_groups, scale=_scale(vae),
                     upsamples=True, dtype=vae.dtype)


def tiled_encode(vae: AutoencoderKL, params, x, *, tile: int = ENCODER_TILE,
                 pad: int = ENCODER_PAD) -> DiagonalGaussian:
    """`vae.encode` with SeeSR's tiled encoder. Below the threshold it *is* `vae.encode`.

    params: the VAE's parameter tree (the "params" collection). x: [B, H, W, 3] in [-1, 1].
    """
    if not needs_tiling(x.shape[1], x.shape[2], tile, pad):
        return vae.apply({"params": params}, x, method="encode")
    moments = tiled_encoder(vae, params, x, tile=tile, pad=pad)
    zc = vae.config.latent_channels
    quant = conv(2 * zc, "quant_conv", kernel=1, padding=0, dtype=vae.dtype)
    moments = quant.apply({"params": params["quant_conv"]}, moments).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    # Same clamp as AutoencoderKL.encode (diffusers keeps exp() finite).
    return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))


def tiled_decode(vae: AutoencoderKL, params, z, *, tile: int = DECODER_TILE,
                 pad: int = DECODER_PAD):
    """`vae.decode` with SeeSR's tiled decoder; float32 [B, 8h, 8w, 3] in about [-1, 1].

    Below the threshold it *is* `vae.decode`. z: unscaled latent [B, h, w, zc].
    """
    if not needs_tiling(z.shape[1], z.shape[2], tile, pad):
        return vae.apply({"params": params}, z, method="decode")
    post = conv(vae.config.latent_channels, "post_quant_conv", kernel=1, padding=0,
                dtype=vae.dtype)
    z = post.apply({"params": params["post_quant_conv"]}, z.astype(vae.dtype))
    return tiled_decoder(vae, params, z, tile=tile, pad=pad).astype(jnp.float32)
