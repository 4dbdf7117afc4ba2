"""A plain-PyTorch reference of pyiqa's CLIPIQA: OpenAI CLIP's ModifiedResNet image tower
and text transformer (module and parameter names as in OpenAI's `clip/model.py`, so its
`state_dict()` has the keys of the released `RN50.pt`), with the attention pool's
positional embedding skipped as pyiqa's `pos_embedding=False` does, and pyiqa's
prompt-pair softmax on top. No torchvision (it breaks the suite's transformers
imports), no `clip` package.

Widths and depths are arguments, so tests can shrink the model without changing a
single key name; `RN50` gives the released sizes.

Also here: OpenAI's own tokenizer, loaded from the `open_clip_torch` wheel's
`tokenizer.py` file without importing the `open_clip` package (which needs torchvision),
and pyiqa's `clip_model.py` loaded the same way, to check this reference against it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["Good image", "bad image", "Sharp image", "blurry image", "sharp edges",
           "blurry edges", "High resolution image", "low resolution image",
           "Noise-free image", "noisy image"]


@dataclasses.dataclass(frozen=True)
class CLIPSizes:
    """OpenAI `CLIP(...)` constructor arguments for a ModifiedResNet model."""

    embed_dim: int = 1024
    image_resolution: int = 224
    vision_layers: tuple = (3, 4, 6, 3)
    vision_width: int = 64
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_layers: int = 12

    @property
    def transformer_heads(self) -> int:
        return self.transformer_width // 64


RN50 = CLIPSizes()


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", nn.BatchNorm2d(out))]))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.avgpool(F.relu(self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class AttentionPool2d(nn.Module):
    """pyiqa's attention pool with pos_embedding=False: the positional embedding is a
    parameter that is never added."""

    def __init__(self, spatial: int, dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial**2 + 1, dim) / dim**0.5)
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)
        self.heads = heads

    def forward(self, x):
        x = x.flatten(2).permute(2, 0, 1)                       # (HW, N, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        out, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False)
        return out[0]


class ModifiedResNet(nn.Module):
    def __init__(self, layers, output_dim: int, heads: int, resolution: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        inplanes = width
        for stage, blocks in enumerate(layers):
            planes = width * 2**stage
            stride = 1 if stage == 0 else 2
            stack = [Bottleneck(inplanes, planes, stride)]
            stack += [Bottleneck(planes * 4, planes, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*stack))
            inplanes = planes * 4
        self.attnpool = AttentionPool2d(resolution // 32, width * 32, heads, output_dim)

    def forward(self, x):
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2),
                         (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = F.avg_pool2d(x, 2)
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return self.attnpool(x)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads)
                                        for _ in range(layers)])

    def forward(self, x, mask):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class CLIP(nn.Module):
    """OpenAI CLIP (ModifiedResNet image tower); `forward` gives pyiqa's
    logits_per_image with pos_embedding=False."""

    def __init__(self, sizes: CLIPSizes = RN50):
        super().__init__()
        s = sizes
        self.visual = ModifiedResNet(s.vision_layers, s.embed_dim, s.vision_width * 32 // 64,
                                     s.image_resolution, s.vision_width)
        self.transformer = Transformer(s.transformer_width, s.transformer_layers,
                                       s.transformer_heads)
        self.token_embedding = nn.Embedding(s.vocab_size, s.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(s.context_length,
                                                             s.transformer_width))
        self.ln_final = nn.LayerNorm(s.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(s.transformer_width, s.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.context_length = s.context_length

    def encode_image(self, pixels):
        return self.visual(pixels)

    def encode_text(self, ids):
        length = ids.shape[1]
        mask = torch.full((length, length), float("-inf")).triu(1)   # causal, additive
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), mask).permute(1, 0, 2)
        x = self.ln_final(x)
        # The EOT token has the largest id of each row.
        return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ self.text_projection

    def forward(self, pixels, ids):
        image = self.encode_image(pixels)
        text = self.encode_text(ids)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * image @ text.t()


def clipiqa_scores(model: CLIP, images_nchw: torch.Tensor, ids: torch.Tensor):
    """pyiqa CLIPIQA.forward for model_type 'clipiqa': (image features, logits, scores)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (images_nchw - mean) / std
    logits = model(x, ids)
    probs = logits.reshape(logits.shape[0], -1, 2).softmax(dim=-1)
    return model.encode_image(x), logits, probs[..., 0].mean(dim=1)


def build(sizes: CLIPSizes, seed: int) -> CLIP:
    """A seeded CLIP with every tensor drawn here (the constructors' own inits skipped):
    He-normal convs, linear layers normal with std fan_in^-1/2 and small biases,
    BatchNorm scales, shifts and running statistics all random (OpenAI zeroes every bn3
    scale, which would hide the residual branches), LayerNorms off their identity, and
    CLIP's normal inits for the embeddings and the text projection."""
    with torch.device("meta"):
        model = CLIP(sizes)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    normal = lambda shape, std: std * torch.randn(shape, generator=g)
    uniform = lambda shape: 0.5 + torch.rand(shape, generator=g)
    with torch.no_grad():
        for tensor in model.state_dict().values():     # NaN marks what is not drawn below
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(uniform(c))
                module.bias.copy_(normal(c, 0.1))
                module.running_mean.copy_(normal(c, 0.1))
                module.running_var.copy_(uniform(c))
                module.num_batches_tracked.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(uniform(module.weight.shape))
                module.bias.copy_(normal(module.bias.shape, 0.05))
            elif isinstance(module, nn.MultiheadAttention):
                w = module.in_proj_weight
                w.copy_(normal(w.shape, w.shape[1] ** -0.5))
                module.in_proj_bias.copy_(normal(module.in_proj_bias.shape, 0.05))
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                gain = 2 if isinstance(module, nn.Conv2d) else 1
                module.weight.copy_(normal(module.weight.shape, (gain / fan_in) ** 0.5))
                if module.bias is not None:
                    module.bias.copy_(normal(module.bias.shape, 0.05))
        pool = model.visual.attnpool.positional_embedding
        pool.copy_(normal(pool.shape, pool.shape[1] ** -0.5))
        width = sizes.transformer_width
        model.token_embedding.weight.copy_(normal(model.token_embedding.weight.shape, 0.02))
        model.positional_embedding.copy_(normal(model.positional_embedding.shape, 0.01))
        model.text_projection.copy_(normal(model.text_projection.shape, width**-0.5))
        model.logit_scale.fill_(math.log(100.0))
    undrawn = [k for k, v in model.state_dict().items() if v.is_floating_point()
               and not torch.isfinite(v).all()]
    assert not undrawn, undrawn
    return model.eval()


def released_state(model: CLIP) -> dict[str, torch.Tensor]:
    """The state dict as RN50.pt's TorchScript module holds it: the model's tensors plus
    the three metadata scalars OpenAI's build_model deletes."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state["input_resolution"] = torch.tensor(model.visual.attnpool.positional_embedding.shape[0])
    state["context_length"] = torch.tensor(model.context_length)
    state["vocab_size"] = torch.tensor(model.token_embedding.num_embeddings)
    return state


def _load_file(module_name: str, path: Path):
    """A single-file module from its path, without importing its package."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def installed_file(package: str, name: str) -> Path:
    """A file of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return path


def openai_tokenizer():
    """OpenAI's SimpleTokenizer as open_clip_torch ships it (its tokenizer.py and
    bpe_simple_vocab_16e6.txt.gz); calling it gives clip.tokenize's ids."""
    module = _load_file("_clipiqa_ref_tokenizer", installed_file("open_clip", "tokenizer.py"))
    return module.SimpleTokenizer()


def bpe_file() -> Path:
    return installed_file("open_clip", "bpe_simple_vocab_16e6.txt.gz")


def pyiqa_clip(model: CLIP, sizes: CLIPSizes):
    """pyiqa's own CLIP class (`pyiqa/archs/clip_model.py`) holding `model`'s weights in
    float32 (its `build_model` would round them to float16)."""
    module = _load_file("_clipiqa_ref_pyiqa_clip",
                        installed_file("pyiqa", "archs/clip_model.py"))
    s = sizes
    ref = module.CLIP(s.embed_dim, s.image_resolution, s.vision_layers, s.vision_width, None,
                      s.context_length, s.vocab_size, s.transformer_width,
                      s.transformer_heads, s.transformer_layers)
    ref.load_state_dict(model.state_dict())
    return ref.eval()


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()
