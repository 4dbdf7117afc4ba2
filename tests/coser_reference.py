"""A PyTorch reference for CoSeR's AiA UNet and ControlNet, written from
docs/coser_reference.md (§2, §3) and independent of jaxsr's code.

The SD parts are stock diffusers modules (ResNets, down blocks, plain
Transformer2DModels, time embedding); the AiA transformer is written here in the
torch idiom with diffusers-style attribute names, and replaces the transformers of
the mid block and of the cross-attention up blocks. Forwards are explicit functions
(no monkey-patching): `aia_unet_forward`, `CoSeRControlNetRef.forward`.

`ldm_state` renames a reference's state dict to CoSeR's LDM keys using the recorded
LDM->diffusers map (tests/data/keys), so the jaxsr converter is tested on the
checkpoint's own names.
"""

import re

import diffusers
import torch
from torch import nn

from tests.keylists import read_map

# --- the AiA transformer -------------------------------------------------------------------


class Attn(nn.Module):
    """Multi-head attention with to_q/to_k/to_v (no bias) and to_out.0.
    mode "softmax": standard; "argmax": out_i = s_ij*·v_j*, j* = first argmax (CoSeR's
    released reference attention)."""

    def __init__(self, dim, ctx_dim, heads, head_dim, mode="softmax"):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.mode = heads, mode
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(ctx_dim, inner, bias=False)
        self.to_v = nn.Linear(ctx_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x, ctx):
        b = x.shape[0]
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))
        sim = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5      # [B, H, Lq, Lk]
        if self.mode == "softmax":
            out = sim.softmax(dim=-1) @ v
        else:
            best, idx = sim.max(dim=-1)                            # first max on ties
            out = torch.gather(v, 2, idx[..., None].expand(-1, -1, -1, v.shape[-1]))
            out = out * best[..., None]
        out = out.transpose(1, 2).reshape(b, x.shape[1], -1)
        return self.to_out[0](out)


class GEGLUFF(nn.Module):
    def __init__(self, dim):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 8 * dim)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        value, gate = self.net[0].proj(x).chunk(2, dim=-1)
        return self.net[2](value * nn.functional.gelu(gate))


class AiABlock(nn.Module):
    def __init__(self, dim, ctx_dim, heads, head_dim):
        super().__init__()
        self.attn1 = Attn(dim, dim, heads, head_dim)
        self.attn2 = Attn(dim, ctx_dim, heads, head_dim)
        self.attn3_lr_lna = Attn(dim, dim, heads, head_dim)
        self.attn4_ref_lna = Attn(dim, dim, heads, head_dim, mode="argmax")
        self.ff = GEGLUFF(dim)
        self.zero_conv_lna = nn.Conv2d(dim, dim, 1)
        self.zero_conv_r_lna = nn.Conv2d(dim, dim, 1)
        for i in range(1, 6):
            setattr(self, f"norm{i}" if i <= 3 else f"norm{i}_lna", nn.LayerNorm(dim))

    @staticmethod
    def _conv_tokens(conv, t, h, w):
        img = t.transpose(1, 2).reshape(t.shape[0], -1, h, w)
        return conv(img).flatten(2).transpose(1, 2)

    def forward(self, x, ctx, lr, ref, h, w):
        if lr is not None:
            x = x + self._conv_tokens(self.zero_conv_r_lna, self.attn4_ref_lna(lr, ref), h, w)
            x = x + self._conv_tokens(self.zero_conv_lna,
                                      self.attn3_lr_lna(self.norm4_lna(x), lr), h, w)
        n = self.norm1(x)
        x = x + self.attn1(n, n)
        x = x + self.attn2(self.norm2(x), ctx)
        return x + self.ff(self.norm3(x))


class AiATransformer(nn.Module):
    """SpatialTransformerV8_refV5 (linear projections). NCHW in and out."""

    def __init__(self, channels, heads, ctx_dim, groups, dubch):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.norm_clr_lna = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in_clr_lna = nn.Linear(channels, channels)
        self.norm_cref_lna = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in_cref_lna = nn.Linear(channels, channels)    # present, never applied
        self.dubch = dubch
        if dubch:
            self.dubconv_lna = nn.Conv2d(channels // 2, channels, 3, 1, 1)
            self.dubconv_r_lna = nn.Conv2d(channels // 2, channels, 3, 1, 1)
        self.transformer_blocks = nn.ModuleList(
            [AiABlock(channels, ctx_dim, heads, channels // heads)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, h, ctx, lr=None, ref=None):
        b, c, hh, ww = h.shape
        tokens = lambda t: t.flatten(2).transpose(1, 2)
        x = self.proj_in(tokens(self.norm(h)))
        lr_t = ref_t = None
        if lr is not None:
            if self.dubch:
                lr, ref = self.dubconv_lna(lr), self.dubconv_r_lna(ref)
            lr_t = self.proj_in_clr_lna(tokens(self.norm_clr_lna(lr)))
            ref_t = tokens(self.norm_cref_lna(ref))                 # the released bug
        x = self.transformer_blocks[0](x, ctx, lr_t, ref_t, hh, ww)
        return self.proj_out(x).transpose(1, 2).reshape(b, c, hh, ww) + h


# --- the AiA UNet ---------------------------------------------------------------------------


def aia_unet(unet_kwargs: dict):
    """A diffusers SD UNet whose mid and cross-attention up transformers are AiA ones.
    LDM's dubch blocks are output_blocks 5 and 8: the last layer (j = 2) of every
    attention up level except the full-resolution one."""
    unet = diffusers.UNet2DConditionModel(**unet_kwargs)
    groups, ctx_dim = unet_kwargs["norm_num_groups"], unet_kwargs["cross_attention_dim"]
    levels = len(unet.up_blocks)

    def replace(attns, dubch_last):
        for j, old in enumerate(attns):
            attns[j] = AiATransformer(old.config.in_channels, old.config.num_attention_heads,
                                      ctx_dim, groups, dubch=dubch_last and j == 2)

    replace(unet.mid_block.attentions, False)
    for i, up in enumerate(unet.up_blocks):
        if hasattr(up, "attentions"):
            replace(up.attentions, i < levels - 1)
    return unet


def aia_unet_forward(unet, x, t, ctx, lr_feats=None, ref_feats=None):
    """CoSeR UNetModelAiA.forward on the reference modules (NCHW). Mid block reads
    feature 12, LDM output block o reads feature 11 - o."""
    emb = unet.time_embedding(unet.time_proj(t))
    pick = lambda i: (None, None) if lr_feats is None else (lr_feats[i], ref_feats[i])
    h = unet.conv_in(x)
    skips = [h]
    for down in unet.down_blocks:
        if hasattr(down, "attentions"):
            h, res = down(h, emb, encoder_hidden_states=ctx)
        else:
            h, res = down(h, emb)
        skips.extend(res)
    mid = unet.mid_block
    h = mid.resnets[1](mid.attentions[0](mid.resnets[0](h, emb), ctx, *pick(12)), emb)
    o = 0
    for up in unet.up_blocks:
        for j, resnet in enumerate(up.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if hasattr(up, "attentions"):
                h = up.attentions[j](h, ctx, *pick(11 - o))
            o += 1
        if up.upsamplers:
            h = up.upsamplers[0](h)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


# --- the ControlNet ---------------------------------------------------------------------------


class CoSeRControlNetRef(nn.Module):
    """CoSeR's ControlNet: an SD encoder without transformers at level 1, hint_zero_conv
    after conv_in, a 1×1 conv per skip and one after the mid block. NCHW."""

    def __init__(self, unet_kwargs: dict):
        super().__init__()
        kw = dict(unet_kwargs)
        kw["down_block_types"] = ("CrossAttnDownBlock2D", "DownBlock2D",
                                  "CrossAttnDownBlock2D", "DownBlock2D")
        kw["up_block_types"] = ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D",
                                "CrossAttnUpBlock2D")
        unet = diffusers.UNet2DConditionModel(**kw)
        self.conv_in, self.time_proj = unet.conv_in, unet.time_proj
        self.time_embedding = unet.time_embedding
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        chans = kw["block_out_channels"]
        self.hint_zero_conv = nn.Conv2d(kw["in_channels"], chans[0], 3, padding=1)
        skip_chans = [chans[0]]
        for i, c in enumerate(chans):
            skip_chans += [c] * kw["layers_per_block"] + ([c] if i < len(chans) - 1 else [])
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(c, c, 1) for c in skip_chans])
        self.controlnet_mid_block = nn.Conv2d(chans[-1], chans[-1], 1)

    def forward(self, x, hint, t, ctx):
        emb = self.time_embedding(self.time_proj(t))
        h = self.conv_in(x) + self.hint_zero_conv(hint)
        skips = [h]
        for down in self.down_blocks:
            if hasattr(down, "attentions"):
                h, res = down(h, emb, encoder_hidden_states=ctx)
            else:
                h, res = down(h, emb)
            skips.extend(res)
        h = self.mid_block(h, emb, encoder_hidden_states=ctx)
        feats = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        return feats + [self.controlnet_mid_block(h)]


# --- diffusers names -> CoSeR's LDM keys --------------------------------------------------------

_ATTN_MODULE = re.compile(r"((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+\.|"
                          r"mid_block\.attentions\.0\.)(.+)")
_LDM_UNET = "model.diffusion_model."


def _recorded_maps():
    """(diffusers name -> LDM tail) for SD2's UNet, and (diffusers transformer prefix ->
    LDM transformer prefix), both read off the recorded map."""
    names, prefixes = {}, {}
    for ldm, diff in (row[:2] for row in read_map("ldm_to_diffusers_unet_map.tsv")):
        tail = ldm[len(_LDM_UNET):]
        names[diff] = tail
        if (m := _ATTN_MODULE.fullmatch(diff)) and tail.endswith("." + m[2]):
            prefixes[m[1]] = tail[: -len(m[2])]
    return names, prefixes


def ldm_state(state: dict, prefix: str) -> dict:
    """A reference state dict (diffusers names) -> CoSeR checkpoint keys under `prefix`
    ("model.diffusion_model." or "structcond_stage_model.")."""
    names, prefixes = _recorded_maps()
    extra = {r"controlnet_down_blocks\.(\d+)\.(.+)": r"zero_convs.\1.0.\2",
             r"controlnet_mid_block\.(.+)": r"middle_block_out.0.\1",
             r"hint_zero_conv\.(.+)": r"hint_zero_conv.\1"}
    out = {}
    for key, value in state.items():
        if key in names:
            tail = names[key]
        elif m := _ATTN_MODULE.fullmatch(key):         # the *_lna tensors
            tail = prefixes[m[1]] + m[2]
        else:
            tail = next(re.sub(p, r, key) for p, r in extra.items() if re.fullmatch(p, key))
        out[prefix + tail] = value
    return out
