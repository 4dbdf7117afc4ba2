"""Tiled VAE (SeeSR's vaehook) against a PyTorch transcription on diffusers' AutoencoderKL.

Tiny VAE with random weights; small tile sizes so tiling triggers on small images.
"""

import math

import diffusers
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxsr.convert.networks import load_vae
from jaxsr.diffusion import tiled_vae as tv
from jaxsr.models.vae import AutoencoderKL, VAEConfig
from tests.parity import nhwc_to_nchw, rel_err, torch_state
from tests.test_unet import randomize_
from tests.test_vae import TINY

ENC_TILE, DEC_TILE = 64, 16  # pads stay the reference's 32 px / 11 latent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY).eval()
    randomize_(ref, seed=3)
    cfg = VAEConfig.from_diffusers_config(dict(ref.config))
    return ref, AutoencoderKL(cfg), load_vae(torch_state(ref), cfg)


# ---- PyTorch transcription of the hook ---------------------------------------------------


def ref_best_tile_size(lowerbound, upperbound):
    divider = 32
    while divider >= 2:
        remainder = lowerbound % divider
        if remainder == 0:
            return lowerbound
        candidate = lowerbound - remainder + divider
        if candidate <= upperbound:
            return candidate
        divider //= 2
    return lowerbound


def ref_split_tiles(h, w, tile_size, pad, is_decoder):
    """bboxes as [x1, x2, y1, y2], like the hook."""
    n_h = max(math.ceil((h - 2 * pad) / tile_size), 1)
    n_w = max(math.ceil((w - 2 * pad) / tile_size), 1)
    t_h = ref_best_tile_size(math.ceil((h - 2 * pad) / n_h), tile_size)
    t_w = ref_best_tile_size(math.ceil((w - 2 * pad) / n_w), tile_size)
    ins, outs = [], []
    for i in range(n_h):
        for j in range(n_w):
            box = [pad + j * t_w, min(pad + (j + 1) * t_w, w),
                   pad + i * t_h, min(pad + (i + 1) * t_h, h)]
            out = [box[0] if box[0] > pad else 0, box[1] if box[1] < w - pad else w,
                   box[2] if box[2] > pad else 0, box[3] if box[3] < h - pad else h]
            outs.append([v * 8 if is_decoder else v // 8 for v in out])
            ins.append([max(0, box[0] - pad), min(w, box[1] + pad),
                        max(0, box[2] - pad), min(h, box[3] + pad)])
    return ins, outs


def _resnet_tasks(r):
    short = r.conv_shortcut if r.conv_shortcut is not None else (lambda t: t)
    return [("store", short), ("norm", r.norm1), ("fn", F.silu), ("fn", r.conv1),
            ("norm", r.norm2), ("fn", F.silu), ("fn", r.conv2), ("add", None)]


def _attn_tasks(a):
    def attend(t):
        b, c, h, w = t.shape
        s = t.reshape(b, c, h * w).transpose(1, 2)
        q, k, v = a.to_q(s), a.to_k(s), a.to_v(s)
        p = torch.softmax(q @ k.transpose(1, 2) * a.scale, dim=-1)
        return a.to_out[0](p @ v).transpose(1, 2).reshape(b, c, h, w)

    return [("store", lambda t: t), ("norm", a.group_norm), ("fn", attend), ("add", None)]


def _mid_tasks(m):
    return _resnet_tasks(m.resnets[0]) + _attn_tasks(m.attentions[0]) + _resnet_tasks(m.resnets[1])


def ref_tasks(net, is_decoder):
    tasks = [("fn", net.conv_in)]
    if is_decoder:
        tasks += _mid_tasks(net.mid_block)
        for blk in net.up_blocks:
            for r in blk.resnets:
                tasks += _resnet_tasks(r)
            if blk.upsamplers is not None:
                tasks.append(("fn", blk.upsamplers[0]))
    else:
        for blk in net.down_blocks:
            for r in blk.resnets:
                tasks += _resnet_tasks(r)
            if blk.downsamplers is not None:
                tasks.append(("fn", blk.downsamplers[0]))
        tasks += _mid_tasks(net.mid_block)
    return tasks + [("norm", net.conv_norm_out), ("fn", F.silu), ("fn", net.conv_out)]


def ref_hooked_forward(net, x, tile_size, pad, is_decoder, groups):
    """Every tile runs up to the next GroupNorm; the norm's statistics are the
    pixel-weighted means of the tiles' (var, mean); then all tiles continue."""
    b, _, h, w = x.shape
    if max(h, w) <= tile_size + 2 * pad:
        return net(x)
    ins, outs = ref_split_tiles(h, w, tile_size, pad, is_decoder)
    tasks = ref_tasks(net, is_decoder)
    tiles = [x[:, :, y1:y2, x1:x2] for x1, x2, y1, y2 in ins]
    res = [None] * len(tiles)
    pos = [0] * len(tiles)
    norm_fn = None
    while True:
        var_list, mean_list, pixel_list, norm_layer = [], [], [], None
        for i in range(len(tiles)):
            if norm_fn is not None:
                tiles[i] = norm_fn(tiles[i])
            while pos[i] < len(tasks):
                kind, fn = tasks[pos[i]]
                pos[i] += 1
                if kind == "norm":
                    t = tiles[i]
                    c = t.shape[1]
                    v, m = torch.var_mean(t.reshape(1, b * groups, c // groups, *t.shape[2:]),
                                          dim=[0, 2, 3, 4], unbiased=False)
                    var_list.append(v)
                    mean_list.append(m)
                    pixel_list.append(t.shape[2] * t.shape[3])
                    norm_layer = fn
                    break
                if kind == "store":
                    res[i] = fn(tiles[i])
                elif kind == "add":
                    tiles[i] = tiles[i] + res[i]
                else:
                    tiles[i] = fn(tiles[i])
        if norm_layer is None:
            break
        px = torch.tensor(pixel_list, dtype=torch.float32) / max(pixel_list)
        px = (px / px.sum())[:, None]
        var = (torch.vstack(var_list) * px).sum(0)
        mean = (torch.vstack(mean_list) * px).sum(0)

        def norm_fn(t, mean=mean, var=var, layer=norm_layer):
            bb, c = t.shape[:2]
            y = F.batch_norm(t.reshape(1, bb * groups, c // groups, *t.shape[2:]), mean, var,
                             training=False, eps=1e-6).reshape(t.shape)
            return y * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)

    s = 8
    result = torch.zeros(b, tiles[0].shape[1], h * s if is_decoder else h // s,
                         w * s if is_decoder else w // s)
    for t, inb, outb in zip(tiles, ins, outs):
        padded = [v * s if is_decoder else v // s for v in inb]
        m = [outb[k] - padded[k] for k in range(4)]
        result[:, :, outb[2]:outb[3], outb[0]:outb[1]] = \
            t[:, :, m[2]:t.shape[2] + m[3], m[0]:t.shape[3] + m[1]]
    return result


# ---- box arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize("lower,upper", [(36, 64), (9, 16), (1023, 1024), (993, 1000), (7, 7),
                                         (64, 64), (100, 101)])
def test_best_tile_size(lower, upper):
    assert tv.best_tile_size(lower, upper) == ref_best_tile_size(lower, upper)


@pytest.mark.parametrize("hw,tile,pad,dec", [
    ((2048, 2048), 1024, 32, False), ((1089, 700), 1024, 32, False),
    ((3000, 1500), 1024, 32, False), ((256, 256), 224, 11, True), ((247, 600), 224, 11, True),
    ((1000, 130), 224, 11, True), ((2000, 300), 224, 11, True),
    ((152, 200), 64, 32, False), ((40, 48), 16, 11, True)])
def test_split_tiles_matches_hook(hw, tile, pad, dec):
    ins, outs = ref_split_tiles(*hw, tile, pad, dec)
    got = tv.split_tiles(*hw, tile, pad, 8, upsamples=dec)
    assert [[t.read.x0, t.read.x1, t.read.y0, t.read.y1] for t in got] == ins
    assert [[t.write.x0, t.write.x1, t.write.y0, t.write.y1] for t in got] == outs


def test_thresholds():
    assert not tv.needs_tiling(1088, 1088, tv.ENCODER_TILE, tv.ENCODER_PAD)
    assert tv.needs_tiling(1089, 64, tv.ENCODER_TILE, tv.ENCODER_PAD)
    assert not tv.needs_tiling(246, 246, tv.DECODER_TILE, tv.DECODER_PAD)
    assert tv.needs_tiling(100, 247, tv.DECODER_TILE, tv.DECODER_PAD)


# ---- numerics ------------------------------------------------------------------------------


def test_below_threshold_is_the_plain_vae(vae):
    """Below the thresholds the traced computation is vae.encode / vae.decode itself."""
    _, model, params = vae
    x = np.zeros((1, 128, 64, 3), np.float32)  # 128 = 64 + 2·32: not tiled
    z = np.zeros((1, 38, 20, 4), np.float32)   # 38 = 16 + 2·11: not tiled
    jaxpr = lambda f, v: str(jax.make_jaxpr(f)(params, v))
    assert jaxpr(lambda p, v: tv.tiled_encode(model, p, v, tile=ENC_TILE), x) == jaxpr(
        lambda p, v: model.apply({"params": p}, v, method="encode"), x)
    assert jaxpr(lambda p, v: tv.tiled_decode(model, p, v, tile=DEC_TILE), z) == jaxpr(
        lambda p, v: model.apply({"params": p}, v, method="decode"), z)
    # and one pixel more does tile
    x1 = np.zeros((1, 129, 64, 3), np.float32)
    assert "scan" in jaxpr(lambda p, v: tv.tiled_encode(model, p, v, tile=ENC_TILE), x1)


def test_op_lists_reproduce_the_vae_with_one_tile(vae):
    """A single tile covering everything must be the untiled network: checks that the
    flattened op lists are exactly jaxsr.models.vae's encoder and decoder."""
    _, model, params = vae
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (1, 32, 40, 3)).astype(np.float32)
    z = rng.standard_normal((1, 5, 4, 4)).astype(np.float32)
    groups = model.config.norm_num_groups

    @jax.jit
    def both(p, x, z):
        enc = tv.run_tiled(tv.encoder_ops(model, p["encoder"]), x,
                           [tv.Tile(tv.Box(0, 32, 0, 40), tv.Box(0, 4, 0, 5))],
                           groups=groups, scale=8, upsamples=False, dtype=np.float32)
        dec = tv.run_tiled(tv.decoder_ops(model, p["decoder"]), z,
                           [tv.Tile(tv.Box(0, 5, 0, 4), tv.Box(0, 40, 0, 32))],
                           groups=groups, scale=8, upsamples=True, dtype=np.float32)
        plain_enc = model.apply({"params": p}, x, method=lambda m, v: m.encoder(v))
        plain_dec = model.apply({"params": p}, z, method=lambda m, v: m.decoder(v))
        return enc, dec, plain_enc, plain_dec

    enc, dec, plain_enc, plain_dec = both(params, x, z)
    assert rel_err(enc, plain_enc) <= 1e-5
    assert rel_err(dec, plain_dec) <= 1e-5


def _psnr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 10 * np.log10(np.ptp(b) ** 2 / np.mean((a - b) ** 2))


def test_tiled_encode_matches_hook_transcription(vae):
    ref, model, params = vae
    # 152×200 px, tile 64 + pad 32: 2×3 tiles of four shapes (128/88 × 128/72 px).
    x = np.random.default_rng(2).uniform(-1, 1, (1, 152, 200, 3)).astype(np.float32)

    @jax.jit
    def run(p, v):
        return tv.tiled_encode(model, p, v, tile=ENC_TILE), model.apply(
            {"params": p}, v, method="encode")

    post, plain = run(params, x)
    with torch.no_grad():
        moments = ref_hooked_forward(ref.encoder, torch.from_numpy(nhwc_to_nchw(x).copy()),
                                     ENC_TILE, 32, False, ref.config.norm_num_groups)
        mean, logvar = ref.quant_conv(moments).chunk(2, dim=1)
    assert rel_err(nhwc_to_nchw(post.mean), mean.numpy()) <= 1e-5
    assert rel_err(nhwc_to_nchw(post.logvar), logvar.clamp(-30, 20).numpy()) <= 1e-5
    # Tiling changes the result (per-tile attention, approximate norm statistics) but
    # stays close to the untiled encoder: measured 37.4 dB on the posterior mean here.
    assert 25 <= _psnr(post.mean, plain.mean) < 100


def test_tiled_decode_matches_hook_transcription(vae):
    ref, model, params = vae
    # 40×27 latent, tile 16 + pad 11: 2×1 tiles of two shapes; batch 2 (per-sample stats).
    z = np.random.default_rng(3).standard_normal((2, 40, 27, 4)).astype(np.float32)

    @jax.jit
    def run(p, v):
        return tv.tiled_decode(model, p, v, tile=DEC_TILE), model.apply(
            {"params": p}, v, method="decode")

    got, plain = run(params, z)
    with torch.no_grad():
        zt = ref.post_quant_conv(torch.from_numpy(nhwc_to_nchw(z).copy()))
        want = ref_hooked_forward(ref.decoder, zt, DEC_TILE, 11, True,
                                  ref.config.norm_num_groups).numpy()
    assert got.shape == (2, 320, 216, 3)
    assert rel_err(nhwc_to_nchw(got), want) <= 1e-5
    assert 25 <= _psnr(got, plain) < 100  # measured 54.4 dB


@pytest.mark.parametrize("coder", ["encode", "decode"])
def test_tiled_vae_keeps_a_sharded_batch_on_its_devices(vae, coder):
    """One image per device: the tiled coders run with no collectives at all and give
    the single-device numbers. (Arenas that folded the batch into their rows made the
    partitioner gather every image's tiles onto every device.)"""
    from jaxsr.plan.hlo import KINDS, collectives

    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip(f"needs 4 host devices, found {len(devices)}")
    _, model, params = vae
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = np.random.default_rng(5)
    if coder == "encode":   # 2×3 tiles of four shapes, as above
        x = rng.uniform(-1, 1, (4, 152, 200, 3)).astype(np.float32)
        fn = lambda p, v: tv.tiled_encode(model, p, v, tile=ENC_TILE).mean
    else:                   # 2×1 tiles of two shapes, as above
        x = rng.standard_normal((4, 40, 27, 4)).astype(np.float32)
        fn = lambda p, v: tv.tiled_decode(model, p, v, tile=DEC_TILE)
    params_d, x_d = jax.device_put(params, replicated), jax.device_put(x, batch)
    compiled = jax.jit(fn, out_shardings=batch).lower(params_d, x_d).compile()
    found = collectives(compiled.as_text())
    assert all(found[k]["count"] == 0 for k in KINDS), found
    got = compiled(params_d, x_d)
    single = jax.jit(fn)(params, x)
    assert rel_err(np.asarray(got), np.asarray(single)) <= 1e-6
