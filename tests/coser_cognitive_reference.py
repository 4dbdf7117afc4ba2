"""PyTorch references for CoSeR's cognitive encoder, written for the parity tests.

- `TorchMSRResNet`: BasicSR's MSRResNet written from the description in
  coser_reference.md §2 (nn.Conv2d, nn.PixelShuffle, F.interpolate bilinear), with
  the checkpoint's module names (conv_first, body.N.conv1, upconv1, ...).
- `TorchVisionTower`: open_clip's VisionTransformer as CoSeR calls it (output_tokens,
  global average pool), written from the description with the real
  `torch.nn.MultiheadAttention`, so `attn.in_proj_weight` / `attn.out_proj` are the
  genuine torch names and layouts. `coser_tokens` is CoSeR's
  `encode_with_vision_transformer`: the unnormalised tokens @ proj.
- The Q-Former reference is transformers' `Blip2QFormerModel`, an independent
  implementation of the same BLIP-2 Q-Former; `blip2_to_coser` renames its state dict
  to the LAVIS/CoSeR names and adds the tensors CoSeR's checkpoint has and
  transformers' module lacks (query tokens, word/position embeddings, position_ids).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from jaxsr.models.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionConfig
from jaxsr.models.qformer import QFormerConfig
from jaxsr.models.srresnet import SRResNetConfig

# ------------------------------------------------------------------------ MSRResNet


class TorchResidualBlockNoBN(nn.Module):
    def __init__(self, num_feat):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class TorchMSRResNet(nn.Module):
    """NCHW [B, 3, h, w] in [0, 1] -> [B, 3, 4h, 4w] (upscale 4 only)."""

    def __init__(self, cfg: SRResNetConfig):
        super().__init__()
        assert cfg.upscale == 4
        f = cfg.num_feat
        self.conv_first = nn.Conv2d(cfg.num_in_ch, f, 3, 1, 1)
        self.body = nn.Sequential(*[TorchResidualBlockNoBN(f) for _ in range(cfg.num_block)])
        self.upconv1 = nn.Conv2d(f, 4 * f, 3, 1, 1)
        self.upconv2 = nn.Conv2d(f, 4 * f, 3, 1, 1)
        self.pixel_shuffle = nn.PixelShuffle(2)
        self.conv_hr = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_last = nn.Conv2d(f, cfg.num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.1)

    def forward(self, x):
        out = self.body(self.lrelu(self.conv_first(x)))
        out = self.lrelu(self.pixel_shuffle(self.upconv1(out)))
        out = self.lrelu(self.pixel_shuffle(self.upconv2(out)))
        out = self.conv_last(self.lrelu(self.conv_hr(out)))
        return out + F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------- vision tower


class TorchResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, mlp_dim):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_dim)),
            ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(mlp_dim, width)),
        ]))

    def forward(self, x):                    # [L, B, W], open_clip 2.20's layout
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TorchTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList([
            TorchResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_dim)
            for _ in range(cfg.layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class TorchVisionTower(nn.Module):
    """forward: NCHW pixels -> (pooled [B, D], tokens [B, 1 + grid², W]) as open_clip's
    `visual(img)` with output_tokens=True, global_average_pool=True."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(w**-0.5 * torch.randn(w))
        self.positional_embedding = nn.Parameter(w**-0.5 * torch.randn(cfg.num_tokens, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = TorchTransformer(cfg)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(w**-0.5 * torch.randn(w, cfg.output_dim))

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        pooled, tokens = x.mean(dim=1), x
        pooled = self.ln_post(pooled) @ self.proj
        return pooled, tokens

    def coser_tokens(self, img):
        """CoSeR `encode_with_vision_transformer`: tokens (before ln_post) @ proj."""
        _, tokens = self(img)
        return tokens @ self.proj


def torch_clip_preprocess(images_nchw, size: int):
    """CoSeR's clipT on a tensor: bicubic Resize (no antialias) + Normalize."""
    x = F.interpolate(images_nchw, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------ Q-Former


def blip2_qformer(cfg: QFormerConfig) -> transformers.Blip2QFormerModel:
    """transformers' Q-Former with CoSeR's structure (text FFN kept), eval mode."""
    config = transformers.Blip2QFormerConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        encoder_hidden_size=cfg.encoder_width, cross_attention_frequency=cfg.cross_attention_freq,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu", use_qformer_text_input=True,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob)
    return transformers.Blip2QFormerModel._from_config(config, attn_implementation="eager").eval()


def blip2_to_coser(hf_state: dict, cfg: QFormerConfig, query_tokens: np.ndarray,
                   rng: np.random.Generator, prefix: str = "global_adapter.") -> dict:
    """transformers Blip2QFormerModel state dict -> CoSeR `global_adapter.*` names.

    transformers: `layernorm`, `encoder.layer.N.{attention,crossattention}.attention.*`;
    LAVIS/CoSeR: `Qformer.embeddings.LayerNorm`, `...{attention,crossattention}.self.*`.
    The embeddings' word/position tables and position_ids, which transformers' module
    does not have, are added (random / arange): CoSeR's checkpoint holds them unused.
    """
    out = {prefix + "query_tokens": query_tokens}
    for key, value in hf_state.items():
        if key.startswith("layernorm."):
            name = "Qformer.embeddings.LayerNorm." + key.split(".", 1)[1]
        else:
            name = "Qformer." + key.replace(".attention.attention.", ".attention.self.")
            name = name.replace(".crossattention.attention.", ".crossattention.self.")
        out[prefix + name] = value
    emb = prefix + "Qformer.embeddings."
    h = cfg.hidden_size
    out[emb + "word_embeddings.weight"] = rng.normal(size=(cfg.vocab_size, h)).astype(np.float32)
    out[emb + "position_embeddings.weight"] = rng.normal(
        size=(cfg.max_position_embeddings, h)).astype(np.float32)
    out[emb + "position_ids"] = np.arange(cfg.max_position_embeddings, dtype=np.int64)[None]
    return out


def perturb_(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add noise to every parameter (unit LN scales and zero biases would hide a
    wrong mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module
