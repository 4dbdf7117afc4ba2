"""PyTorch references for LPIPS v0.1 and DISTS, in plain torch (no torchvision: installing
it beside this torch breaks the transformers and diffusers imports of the suite).

They follow `lpips` 0.1.4 (`lpips/lpips.py`, `pretrained_networks.py`) and
`DISTS_pytorch` 0.1 (`DISTS_pt.py`) step by step in NCHW: the trunks are torchvision's
AlexNet / VGG16 `features` Sequentials rebuilt layer for layer (same indices, so the
state-dict keys are torchvision's `features.N.*`), and the heads and alpha/beta load
from the real files those packages ship (`lpips_head_file`, `dists_weights_file`).

Also here: the single-file layouts pyiqa's LPIPS and DISTS modules save (their
`state_dict()` key names), built from the same tensors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# torchvision indices after which lpips / DISTS tap the trunk.
ALEX_TAPS = (1, 4, 7, 9, 11)
VGG_TAPS = (3, 8, 15, 22, 29)
ALEX_CHANNELS = (64, 192, 384, 256, 256)
VGG_CHANNELS = (64, 128, 256, 512, 512)
# pyiqa's slices (LPIPS) and stages (DISTS) hold these torchvision indices.
ALEX_SLICES = (range(0, 2), range(2, 5), range(5, 8), range(8, 10), range(10, 12))
VGG_SLICES = (range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30))


def package_dir(name: str) -> Path:
    """An installed package's folder, found without importing it (importing lpips or
    DISTS_pytorch would import torchvision)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name} is not installed "
                                f"(pip install --no-deps lpips==0.1.4 DISTS_pytorch==0.1)")
    return Path(list(spec.submodule_search_locations)[0])


def lpips_head_file(net: str) -> Path:
    """The lpips wheel's v0.1 linear heads: alex.pth or vgg.pth."""
    return package_dir("lpips") / "weights" / "v0.1" / f"{net}.pth"


def dists_weights_file() -> Path:
    """The DISTS_pytorch wheel's alpha/beta file."""
    return package_dir("DISTS_pytorch") / "weights.pt"


def alexnet_features() -> nn.Sequential:
    """torchvision.models.alexnet().features, index for index."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))


def vgg16_features(pool=lambda channels: nn.MaxPool2d(2, 2)) -> nn.Sequential:
    """torchvision.models.vgg16().features, index for index; `pool(channels)` builds
    each of the five pools (DISTS swaps in L2 pooling)."""
    layers, cin = [], 3
    for stage, width in enumerate(VGG_CHANNELS):
        for _ in range(2 if stage < 2 else 3):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
            cin = width
        layers.append(pool(width))
    return nn.Sequential(*layers)


def randomize_trunk(features: nn.Sequential, seed: int) -> None:
    """He-normal kernels (activations keep their scale through 13 layers) and non-zero
    biases (so a dropped or swapped bias changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in features:
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)


def torchvision_file_state(features: nn.Sequential, seed: int) -> dict:
    """What torchvision's ImageNet file holds: `features.N.*` and the classifier
    (`classifier.1/4/6.*`). The classifier is random and shrunk: the converters must
    drop it whatever its shape, and full size it would be ~500 MB."""
    g = torch.Generator().manual_seed(seed)
    state = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    for i in (1, 4, 6):
        state[f"classifier.{i}.weight"] = torch.randn(8, 8, generator=g)
        state[f"classifier.{i}.bias"] = torch.randn(8, generator=g)
    return state


def _normalize_tensor(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + eps)


class _NetLinLayer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPSReference(nn.Module):
    """lpips.LPIPS(net=..., version='0.1') evaluated with normalize=True (inputs in
    [0, 1], as pyiqa calls it). State-dict keys: `features.N.*` (the trunk) and
    `linK.model.1.weight` (the heads), so torchvision's file and lpips's head file
    load into it together."""

    def __init__(self, net: str):
        super().__init__()
        self.features = alexnet_features() if net == "alex" else vgg16_features()
        self.taps = ALEX_TAPS if net == "alex" else VGG_TAPS
        channels = ALEX_CHANNELS if net == "alex" else VGG_CHANNELS
        for k, c in enumerate(channels):
            setattr(self, f"lin{k}", _NetLinLayer(c))
        self.shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
        self.scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
        self.eval()

    def _taps(self, x):
        out = []
        for i, layer in enumerate(self.features[: max(self.taps) + 1]):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, in0, in1):
        """in0, in1 (B, 3, H, W) in [0, 1] -> (B,)."""
        in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        outs0 = self._taps((in0 - self.shift) / self.scale)
        outs1 = self._taps((in1 - self.shift) / self.scale)
        val = 0
        for k, (a, b) in enumerate(zip(outs0, outs1)):
            diff = (_normalize_tensor(a) - _normalize_tensor(b)) ** 2
            val = val + getattr(self, f"lin{k}")(diff).mean([2, 3], keepdim=True)
        return val.reshape(-1)


class L2Pooling(nn.Module):
    """DISTS_pytorch's L2pooling(filter_size=5, stride=2): a 3x3 window (the inner taps of
    np.hanning(5)), padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        a = np.hanning(5)[1:-1]
        g = torch.Tensor(a[:, None] * a[None, :])
        g = g / torch.sum(g)
        # Not in the state dict: the file layout under test is torchvision's + weights.pt.
        self.register_buffer("filter", g[None, None].repeat(channels, 1, 1, 1),
                             persistent=False)

    def forward(self, x):
        out = F.conv2d(x**2, self.filter, stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


class DISTSReference(nn.Module):
    """DISTS_pytorch.DISTS: VGG16 with L2 pooling, alpha/beta (1, 1475, 1, 1).
    State-dict keys `features.N.*`, `alpha`, `beta` (the filters are not saved)."""

    CHANNELS = (3, *VGG_CHANNELS)

    def __init__(self):
        super().__init__()
        self.features = vgg16_features(pool=L2Pooling)
        self.alpha = nn.Parameter(torch.zeros(1, sum(self.CHANNELS), 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, sum(self.CHANNELS), 1, 1))
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, -1, 1, 1)
        self.eval()

    def _stages(self, x):
        out, h = [x], (x - self.mean) / self.std
        for i, layer in enumerate(self.features[: max(VGG_TAPS) + 1]):
            h = layer(h)
            if i in VGG_TAPS:
                out.append(h)
        return out

    def forward(self, x, y):
        """x, y (B, 3, H, W) in [0, 1] -> (B,)."""
        feats0, feats1 = self._stages(x), self._stages(y)
        dist1 = dist2 = 0
        c1 = c2 = 1e-6
        w_sum = self.alpha.sum() + self.beta.sum()
        alpha = torch.split(self.alpha / w_sum, self.CHANNELS, dim=1)
        beta = torch.split(self.beta / w_sum, self.CHANNELS, dim=1)
        for k in range(len(self.CHANNELS)):
            x_mean = feats0[k].mean([2, 3], keepdim=True)
            y_mean = feats1[k].mean([2, 3], keepdim=True)
            s1 = (2 * x_mean * y_mean + c1) / (x_mean**2 + y_mean**2 + c1)
            dist1 = dist1 + (alpha[k] * s1).sum(1, keepdim=True)
            x_var = ((feats0[k] - x_mean) ** 2).mean([2, 3], keepdim=True)
            y_var = ((feats1[k] - y_mean) ** 2).mean([2, 3], keepdim=True)
            xy_cov = (feats0[k] * feats1[k]).mean([2, 3], keepdim=True) - x_mean * y_mean
            s2 = (2 * xy_cov + c2) / (x_var + y_var + c2)
            dist2 = dist2 + (beta[k] * s2).sum(1, keepdim=True)
        return (1 - (dist1 + dist2)).reshape(-1)


def pyiqa_lpips_state(trunk: dict, heads: dict, net: str) -> dict:
    """pyiqa's LPIPS.state_dict() layout: `scaling_layer.shift/scale`, the trunk as
    `net.sliceK.N.*`, the heads `linK.model.1.weight`."""
    slices = ALEX_SLICES if net == "alex" else VGG_SLICES
    state = {"scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None],
             "scaling_layer.scale": torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]}
    for k, indices in enumerate(slices, start=1):
        for i in indices:
            for leaf in ("weight", "bias"):
                if f"features.{i}.{leaf}" in trunk:
                    state[f"net.slice{k}.{i}.{leaf}"] = trunk[f"features.{i}.{leaf}"]
    return {**state, **heads}


def pyiqa_dists_state(reference: DISTSReference) -> dict:
    """pyiqa's DISTS.state_dict() layout: `stageK.N.*` (with the pools' `filter`
    buffers), `mean`, `std`, `alpha`, `beta`."""
    state = {"mean": reference.mean.clone(), "std": reference.std.clone(),
             "alpha": reference.alpha.detach().clone(), "beta": reference.beta.detach().clone()}
    for k, indices in enumerate(VGG_SLICES, start=1):
        for i in indices:
            layer = reference.features[i]
            if isinstance(layer, L2Pooling):
                state[f"stage{k}.{i}.filter"] = layer.filter.clone()
            for leaf in ("weight", "bias"):
                if isinstance(layer, nn.Conv2d):
                    state[f"stage{k}.{i}.{leaf}"] = getattr(layer, leaf).detach().clone()
    return state
