"""pyiqa's MANIQA (`pyiqa/archs/maniqa_arch.py`, `pyiqa/archs/maniqa_swin.py`, pyiqa
0.1.16) restated in plain torch, for parity tests.

pyiqa builds the trunk with timm's `vit_base_patch8_224` and imports torchvision; neither
is a test dependency, so the trunk is restated here too (timm's `VisionTransformer`:
conv patch embedding, cls token, learned position embedding, pre-LN blocks with LayerNorm
eps 1e-6, fused qkv attention, exact-GELU MLP, final norm and classifier head). Module
and buffer names are pyiqa's and timm's, so `state_dict()` has the keys of the release
file `ckpt_koniq10k.pt`. Sizes are arguments so tests can shrink the network; the trunk
width is `embed_dim`, as in pyiqa, where the same number sizes the ViT and the first
Swin stage.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN = STD = (0.5, 0.5, 0.5)  # pyiqa's IMAGENET_INCEPTION_MEAN / _STD


class VitAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class VitMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VitBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VitAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = VitMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """timm's ViT; `forward` returns every block's output (what pyiqa's hooks collect)."""

    def __init__(self, img_size, patch, dim, depth, heads, num_classes=1000):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[VitBlock(dim, heads, 4 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


class TABlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_q = nn.Linear(dim, dim)
        self.c_k = nn.Linear(dim, dim)
        self.c_v = nn.Linear(dim, dim)
        self.norm_fact = dim**-0.5

    def forward(self, x):
        b, c, n = x.shape
        attn = (self.c_q(x) @ self.c_k(x).transpose(-2, -1) * self.norm_fact).softmax(-1)
        return (attn @ self.c_v(x)).transpose(1, 2).reshape(b, c, n) + x


def window_partition(x, w):
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, c)


def window_reverse(windows, w, h, wd):
    b = windows.shape[0] // ((h // w) * (wd // w))
    x = windows.view(b, h // w, wd // w, w, w, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, -1)


class WindowAttention(nn.Module):
    def __init__(self, dim, window, heads):
        super().__init__()
        self.window, self.heads = window, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1)
                             + rel[..., 1])
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim, resolution, heads, window, shift, dim_mlp):
        super().__init__()
        self.resolution = resolution
        if resolution <= window:
            window, shift = resolution, 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = VitMlp(dim, dim_mlp)
        mask = None
        if shift:
            regions = torch.zeros(1, resolution, resolution, 1)
            cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            label = 0
            for hs in cuts:
                for ws in cuts:
                    regions[:, hs, ws, :] = label
                    label += 1
            win = window_partition(regions, window).view(-1, window * window)
            diff = win.unsqueeze(1) - win.unsqueeze(2)
            mask = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
        self.register_buffer("attn_mask", mask)

    def forward(self, x):
        r, s, w = self.resolution, self.shift, self.window
        b, n, c = x.shape
        y = self.norm1(x).view(b, r, r, c)
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = self.attn(window_partition(y, w).view(-1, w * w, c), self.attn_mask)
        y = window_reverse(y.view(-1, w, w, c), w, r, r)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + y.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    def __init__(self, dim, resolution, depth, heads, window, dim_mlp):
        super().__init__()
        self.resolution = resolution
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2, dim_mlp)
            for i in range(depth)])

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, self.resolution, self.resolution)
        return F.relu(self.conv(x)).flatten(2).transpose(1, 2)


class SwinTransformer(nn.Module):
    def __init__(self, resolution, depths, heads, dim, window, dim_mlp, scale):
        super().__init__()
        self.scale, self.resolution = scale, resolution
        # Built by pyiqa but never called in its forward; kept for the state-dict keys.
        self.downsample = nn.Conv2d(dim, dim, 3, 2, 1)
        self.layers = nn.ModuleList([BasicLayer(dim, resolution, d, h, window, dim_mlp)
                                     for d, h in zip(depths, heads)])

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = self.scale * layer(x) + x
        return x.transpose(1, 2).reshape(b, c, h, w)


def _head(dim, outputs, last):
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(dim, outputs), last)


def uniform_crop(x, crop_size, crop_num):
    """pyiqa's `uniform_crop` for one tensor: bilinear upscale (by scale_factor) when the
    short side is <= crop_size, then the first crop_num crops of a ceil(sqrt)^2 grid
    with step (side - crop) // floor(sqrt(crop_num)); crops of an image are adjacent."""
    b, c, h, w = x.shape
    if min(h, w) <= crop_size:
        x = F.interpolate(x, scale_factor=(crop_size + 1) / min(h, w), mode="bilinear")
        b, c, h, w = x.shape
    step_h = (h - crop_size) // int(np.sqrt(crop_num))
    step_w = (w - crop_size) // int(np.sqrt(crop_num))
    grid = int(np.ceil(np.sqrt(crop_num)))
    crops = [x[..., i * step_h:i * step_h + crop_size, j * step_w:j * step_w + crop_size]
             for i in range(grid) for j in range(grid)]
    return torch.stack(crops[:crop_num], dim=1).reshape(b * crop_num, c, crop_size, crop_size)


class MANIQA(nn.Module):
    def __init__(self, embed_dim=768, num_outputs=1, patch_size=8, depths=(2, 2),
                 window_size=4, dim_mlp=768, num_heads=(4, 4), img_size=224, num_tab=2,
                 scale=0.8, test_sample=20, vit_depth=12, vit_heads=12, vit_classes=1000,
                 taps=(6, 7, 8, 9)):
        super().__init__()
        self.img_size, self.test_sample, self.taps = img_size, test_sample, taps
        self.input_size = img_size // patch_size
        tokens = self.input_size**2
        self.vit = VisionTransformer(img_size, patch_size, embed_dim, vit_depth, vit_heads,
                                     vit_classes)
        self.tablock1 = nn.ModuleList([TABlock(tokens) for _ in range(num_tab)])
        self.conv1 = nn.Conv2d(embed_dim * 4, embed_dim, 1, 1, 0)
        self.swintransformer1 = SwinTransformer(self.input_size, depths, num_heads, embed_dim,
                                                window_size, dim_mlp, scale)
        self.tablock2 = nn.ModuleList([TABlock(tokens) for _ in range(num_tab)])
        self.conv2 = nn.Conv2d(embed_dim, embed_dim // 2, 1, 1, 0)
        self.swintransformer2 = SwinTransformer(self.input_size, depths, num_heads,
                                                embed_dim // 2, window_size, dim_mlp, scale)
        self.fc_score = _head(embed_dim // 2, num_outputs, nn.ReLU())
        self.fc_weight = _head(embed_dim // 2, num_outputs, nn.Sigmoid())

    def forward(self, x):
        """x (N, 3, H, W) in [0, 1] -> (N, 1)."""
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        x = (x - mean) / std
        bsz = x.shape[0]
        x = uniform_crop(x, self.img_size, self.test_sample)
        outputs = self.vit(x)
        x = torch.cat([outputs[i][:, 1:] for i in self.taps], dim=2)
        s = self.input_size
        x = x.transpose(1, 2)
        for tab in self.tablock1:
            x = tab(x)
        x = self.conv1(x.reshape(x.shape[0], -1, s, s))
        x = self.swintransformer1(x).flatten(2)
        for tab in self.tablock2:
            x = tab(x)
        x = self.conv2(x.reshape(x.shape[0], -1, s, s))
        x = self.swintransformer2(x).flatten(2).transpose(1, 2)
        score = self.fc_score(x).reshape(bsz, -1)
        weight = self.fc_weight(x).reshape(bsz, -1)
        return ((weight * score).sum(-1) / (weight.sum(-1) + 1e-8)).unsqueeze(1)
