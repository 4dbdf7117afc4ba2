"""A PyTorch RAM (Swin + Query2Label tagging head) written from the description of
RAM/SeeSR, in the torch idiom of the original (view/permute windows, torch.roll,
masked_fill), with module names equal to the RAM checkpoint's, at a small size with
RAM's structure: 96 px / patch 4 -> 24, 12, 6, 3 tokens per side with window 3, so
stages 0-2 use shifted windows (shift 1) and the last stage's window is the whole 3x3
map (no shift), as at 384 px with window 12. Shared by the DAPE parity and DAPE
training tests."""

import torch
from torch import nn

IMG, PATCH, EMBED, DEPTHS, HEADS, WINDOW = 96, 4, 16, (2, 2, 2, 2), (1, 2, 2, 4), 3
HIDDEN, HEAD_HEADS, INTER, WIDTH, CLASSES, RANK = 32, 4, 64, 24, 20, 8


# ----------------------------------------------------------------- torch reference
def _windows(x, w):
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def _unwindows(x, w, h, wd):
    b = x.shape[0] // ((h // w) * (wd // w))
    x = x.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, -1)


class TAttn(nn.Module):
    def __init__(self, dim, heads, w):
        super().__init__()
        self.heads, self.w = heads, w
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * w - 1) ** 2, heads))
        ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
        pos = torch.stack([ys.flatten(), xs.flatten()])                  # [2, w²]
        d = (pos[:, :, None] - pos[:, None, :]).permute(1, 2, 0) + (w - 1)
        self.register_buffer("relative_position_index", d[..., 0] * (2 * w - 1) + d[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask):
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // self.heads) ** -0.5, qkv[1], qkv[2]
        a = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        a = a + bias.reshape(n, n, -1).permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            a = (a.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]).view(-1,
                                                                                  self.heads, n, n)
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c))


class TMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class TBlock(nn.Module):
    def __init__(self, dim, res, heads, w, shift):
        super().__init__()
        if res <= w:
            w, shift = res, 0
        self.res, self.w, self.shift = res, w, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = TAttn(dim, heads, w), TMlp(dim)
        mask = None
        if shift:
            label = torch.zeros(1, res, res, 1)
            cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
            for i, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
                label[:, hs, ws] = i
            lw = _windows(label, w)[..., 0]                                 # [nW, w²]
            diff = lw[:, None, :] - lw[:, :, None]
            mask = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
        self.register_buffer("attn_mask", mask)

    def forward(self, x):
        b, _, c = x.shape
        y = self.norm1(x).view(b, self.res, self.res, c)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = _unwindows(self.attn(_windows(y, self.w), self.attn_mask), self.w, self.res,
                       self.res)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y.reshape(b, -1, c)
        return x + self.mlp(self.norm2(x))


class TMerge(nn.Module):
    def __init__(self, dim, res):
        super().__init__()
        self.res = res
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        b, _, c = x.shape
        x = x.view(b, self.res, self.res, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class TStage(nn.Module):
    def __init__(self, dim, res, depth, heads, w, last):
        super().__init__()
        self.blocks = nn.ModuleList(
            [TBlock(dim, res, heads, w, 0 if i % 2 == 0 else w // 2) for i in range(depth)])
        self.downsample = None if last else TMerge(dim, res)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class TPatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, EMBED, PATCH, PATCH)
        self.norm = nn.LayerNorm(EMBED)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class TSwin(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = TPatchEmbed()
        res = IMG // PATCH
        self.layers = nn.ModuleList([
            TStage(EMBED * 2 ** i, res // 2 ** i, d, h, WINDOW, i == len(DEPTHS) - 1)
            for i, (d, h) in enumerate(zip(DEPTHS, HEADS))])
        self.norm = nn.LayerNorm(EMBED * 2 ** (len(DEPTHS) - 1))

    def forward(self, x):
        x, stages = self.patch_embed(x), []
        for layer in self.layers:
            x = layer(x)
            stages.append(x)
        x = self.norm(x)
        return torch.cat([x.mean(1, keepdim=True), x], 1), stages


class TSelf(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key, self.value = nn.Linear(WIDTH, HIDDEN), nn.Linear(WIDTH, HIDDEN)

    def forward(self, x, ctx):
        split = lambda t: t.view(t.shape[0], t.shape[1], HEAD_HEADS, -1).permute(0, 2, 1, 3)
        q, k, v = split(self.query(x)), split(self.key(ctx)), split(self.value(ctx))
        p = (q @ k.transpose(-1, -2) / (HIDDEN // HEAD_HEADS) ** 0.5).softmax(-1)
        return (p @ v).permute(0, 2, 1, 3).reshape(x.shape)


class TOut(nn.Module):
    def __init__(self, n_in):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(n_in, HIDDEN), nn.LayerNorm(HIDDEN, eps=1e-12)

    def forward(self, h, x):
        return self.LayerNorm(self.dense(h) + x)


class TCross(nn.Module):
    def __init__(self):
        super().__init__()
        self.self, self.output = TSelf(), TOut(HIDDEN)


class TInter(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, INTER)


class TLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.crossattention, self.intermediate, self.output = TCross(), TInter(), TOut(INTER)

    def forward(self, x, ctx):
        x = self.crossattention.output(self.crossattention.self(x, ctx), x)
        return self.output(nn.functional.gelu(self.intermediate.dense(x)), x)


class TEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([TLayer(), TLayer()])


class THead(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = TEncoder()


class TRAM(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual_encoder = TSwin()
        self.image_proj = nn.Linear(EMBED * 2 ** (len(DEPTHS) - 1), WIDTH)
        self.label_embed = nn.Parameter(torch.randn(CLASSES, WIDTH))
        self.wordvec_proj = nn.Linear(WIDTH, HIDDEN)
        self.tagging_head = THead()
        self.fc = nn.Linear(HIDDEN, 1)

    def forward(self, images):
        feats, stages = self.visual_encoder(images)
        embeds = self.image_proj(feats)
        x = torch.relu(self.wordvec_proj(self.label_embed))[None].repeat(images.shape[0], 1, 1)
        for layer in self.tagging_head.encoder.layer:
            x = layer(x, embeds)
        return stages, embeds, self.fc(x).squeeze(-1)


def ram_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def lora_dict(model, seed=3):
    """DAPE-style LoRA tensors (B non-zero, as after training) for every adapted module."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: 0.3 * torch.randn(*s, generator=g)
    out = {}
    for name, mod in model.named_modules():
        if name.endswith("attn.qkv"):
            dim = mod.in_features
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = rnd(2 * RANK, dim), rnd(2 * dim, RANK)
    for i in range(2):
        for proj, n_in in (("query", HIDDEN), ("key", WIDTH)):
            for owner in ("tagging_head", "tag_encoder"):  # tag_encoder = the tied twin
                base = f"{owner}.encoder.layer.{i}.crossattention.self.{proj}"
                out[f"{base}.lora_A"], out[f"{base}.lora_B"] = rnd(RANK, n_in), rnd(HIDDEN, RANK)
    return {k: v.numpy() for k, v in out.items()}


def apply_lora_explicitly(model, lora):
    """The reference's LoRA merge, written out: q rows += B_q A_q / 8, v rows += B_v A_v / 8;
    tied head query/key += (B_head A_head + B_tagenc A_tagenc) / 8."""
    t = {k: torch.from_numpy(v) for k, v in lora.items()}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("attn.qkv"):
                d = mod.in_features
                a, b = t[f"{name}.lora_A"], t[f"{name}.lora_B"]
                mod.weight[:d] += b[:d] @ a[:RANK] / 8
                mod.weight[2 * d:] += b[d:] @ a[RANK:] / 8
        for i in range(2):
            for proj in ("query", "key"):
                mod = getattr(model.tagging_head.encoder.layer[i].crossattention.self, proj)
                delta = 0
                for owner in ("tag_encoder", "tagging_head"):
                    base = f"{owner}.encoder.layer.{i}.crossattention.self.{proj}"
                    delta = delta + t[f"{base}.lora_B"] @ t[f"{base}.lora_A"]
                mod.weight += delta / 8


def build_reference(seed=0):
    torch.manual_seed(seed)
    model = TRAM().eval()
    with torch.no_grad():  # non-trivial norms and biases so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape))
    return model
