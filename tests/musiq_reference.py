"""pyiqa's MUSIQ (`pyiqa/archs/musiq_arch.py`, `pyiqa/data/multiscale_trans_util.py`)
restated in plain torch, for parity tests.

pyiqa's package imports torchvision (which cannot be installed beside this project's
torch) and is no test dependency, so this file states the same computation in NCHW
torch ops: TF-'SAME' padding with `F.pad`, `F.unfold` patches, `F.interpolate`
(bicubic resize, nearest for the hashed positions), `masked_fill` attention. Module
names are pyiqa's, so `state_dict()` has the release file's keys; the sizes are
arguments so tests can shrink the transformer.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _same_pad(x, kernel, stride):
    """TF 'SAME' zero padding of an NCHW tensor (extra row/column after)."""
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad takes the last axis first
        total = (math.ceil(size / stride) - 1) * stride + kernel - size
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class StdConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        w = w / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(_same_pad(x, self.kernel_size[0], self.stride[0]), w, self.bias,
                         self.stride)


class Bottleneck(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = StdConv(cin, cin, 1, 1, bias=False)
        self.gn1 = nn.GroupNorm(32, cin, eps=1e-4)
        self.conv2 = StdConv(cin, cin, 3, 1, bias=False)
        self.gn2 = nn.GroupNorm(32, cin, eps=1e-4)
        self.conv3 = StdConv(cin, cout, 1, 1, bias=False)
        self.gn3 = nn.GroupNorm(32, cout, eps=1e-4)
        self.conv_proj = StdConv(cin, cout, 1, 1, bias=False)
        self.gn_proj = nn.GroupNorm(32, cout, eps=1e-4)

    def forward(self, x):
        skip = self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        return F.relu(self.gn3(self.conv3(y)) + skip)


class MultiHeadAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, n, d = x.shape

        def heads(t):
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        logits = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        pair = mask.reshape(b, 1, n, 1) * mask.reshape(b, 1, 1, n)
        attn = logits.masked_fill(pair == 0, -1e3).softmax(dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim, mlp_dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x, mask):
        x = x + self.attention(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class AddHashSpatialPositionEmbs(nn.Module):
    def __init__(self, grid, dim):
        super().__init__()
        self.position_emb = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)


class AddScaleEmbs(nn.Module):
    def __init__(self, num_scales, dim):
        super().__init__()
        self.scale_emb = nn.Parameter(torch.randn(num_scales, dim) * 0.02)


class TransformerEncoder(nn.Module):
    def __init__(self, dim, mlp_dim, heads, layers, num_scales, grid):
        super().__init__()
        self.posembed_input = AddHashSpatialPositionEmbs(grid, dim)
        self.scaleembed_input = AddScaleEmbs(num_scales, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.transformer = nn.ModuleDict(
            {f"encoderblock_{i}": TransformerBlock(dim, mlp_dim, heads) for i in range(layers)})

    def forward(self, x, positions, scales, mask):
        x = x + self.posembed_input.position_emb[0][positions] + self.scaleembed_input.scale_emb[
            scales]
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        for block in self.transformer.values():
            x = block(x, mask)
        return self.encoder_norm(x)


class MUSIQ(nn.Module):
    def __init__(self, patch_size=32, num_class=1, hidden_size=384, mlp_dim=1152, num_heads=6,
                 num_layers=14, num_scales=3, spatial_pos_grid_size=10,
                 longer_side_lengths=(224, 384), max_seq_len_from_original_res=-1):
        super().__init__()
        self.patch_size = patch_size
        self.grid = spatial_pos_grid_size
        self.longer_side_lengths = sorted(longer_side_lengths)
        self.max_seq_len_from_original_res = max_seq_len_from_original_res
        self.conv_root = StdConv(3, 64, 7, 2, bias=False)
        self.gn_root = nn.GroupNorm(32, 64, eps=1e-6)
        self.block1 = Bottleneck(64, 256)
        self.embedding = nn.Linear(256 * (patch_size // 4) ** 2, hidden_size)
        self.transformer_encoder = TransformerEncoder(
            hidden_size, mlp_dim, num_heads, num_layers, num_scales, spatial_pos_grid_size)
        if num_class > 1:
            self.head = nn.Sequential(nn.Linear(hidden_size, num_class), nn.Softmax(dim=-1))
        else:
            self.head = nn.Linear(hidden_size, num_class)

    # --------------------------------------------------------------- preprocessing

    def _positions(self, count_h, count_w):
        grid = torch.arange(self.grid, dtype=torch.float32).reshape(1, 1, -1)
        rows = F.interpolate(grid, size=count_h, mode="nearest").reshape(-1, 1)
        cols = F.interpolate(grid, size=count_w, mode="nearest").reshape(1, -1)
        return (rows * self.grid + cols).reshape(-1)

    def _scale_tokens(self, image, scale_id, max_len):
        """image (B, 3, h, w) -> (B, n, 3 P P + 3): pixels, position, scale, mask."""
        b, _, h, w = image.shape
        p = self.patch_size
        pix = F.unfold(_same_pad(image, p, p), p, stride=p)  # (B, 3 P P, n)
        n = pix.shape[-1]
        pos = self._positions(math.ceil(h / p), math.ceil(w / p))
        extra = torch.stack([pos, torch.full((n,), float(scale_id)), torch.ones(n)])
        tokens = torch.cat([pix, extra.expand(b, 3, n)], dim=1)
        if max_len >= 0:
            tokens = torch.cat([tokens, tokens.new_zeros(b, tokens.shape[1], max_len)], -1)
            tokens = tokens[..., :max_len]
        return tokens.transpose(1, 2)

    def multiscale_tokens(self, x):
        """(B, 3, H, W) in [-1, 1] -> (B, L, 3 P P + 3), pyiqa's packed layout."""
        _, _, h, w = x.shape
        parts = []
        for scale_id, longer in enumerate(self.longer_side_lengths):
            ratio = longer / max(h, w)
            size = (round(h * ratio), round(w * ratio))
            resized = F.interpolate(x, size, mode="bicubic", align_corners=False)
            parts.append(self._scale_tokens(resized, scale_id,
                                            math.ceil(longer / self.patch_size) ** 2))
        if self.max_seq_len_from_original_res is not None:
            parts.append(self._scale_tokens(x, len(self.longer_side_lengths),
                                            self.max_seq_len_from_original_res))
        return torch.cat(parts, dim=1)

    def forward(self, images):
        """images (B, 3, H, W) in [0, 1] -> (B,) scores."""
        tokens = self.multiscale_tokens((images - 0.5) * 2)
        b, n, _ = tokens.shape
        positions, scales = tokens[..., -3].long(), tokens[..., -2].long()
        mask = tokens[..., -1].bool()
        x = tokens[..., :-3].reshape(-1, 3, self.patch_size, self.patch_size)
        x = F.relu(self.gn_root(self.conv_root(x)))
        x = F.max_pool2d(_same_pad(x, 3, 2), 3, 2)
        x = self.block1(x).permute(0, 2, 3, 1).reshape(b, n, -1)
        x = self.transformer_encoder(self.embedding(x), positions, scales, mask)
        q = self.head(x[:, 0])
        return (q * torch.arange(1, q.shape[-1] + 1, dtype=q.dtype)).sum(-1)
