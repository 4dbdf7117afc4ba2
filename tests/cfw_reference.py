"""PyTorch reference of StableSR's CFW autoencoder (`AutoencoderKLResi` with
`Decoder_Mix`), written for the parity tests from coser_reference.md §6.

The plain VAE parts are diffusers' AutoencoderKL modules, re-run step by step so
the encoder features can be read and the fusion inserted; the fusion layers are
written here in the torch idiom under StableSR's module names, so `state_dict()`
gives the checkpoint's key names. `ldm_state_dict` renames the diffusers VAE
tensors to the LDM names with the recorded diffusers-converter map (independent of
jaxsr's rename rules).
"""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tests.keylists import read_map

EPS = 1e-6


class FusionResBlock(nn.Module):
    """StableSR's `ResBlock`: GN-SiLU-conv twice, 1×1 `conv_out` shortcut when widths differ."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_out = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_out is None else self.conv_out(x))


class DenseBlock(nn.Module):
    """ESRGAN dense block (basicsr's ResidualDenseBlock): five 3×3 convs on growing
    concatenations, LeakyReLU 0.2 after the first four, residual scaled by 0.2."""

    def __init__(self, channels, grow):
        super().__init__()
        for k in range(1, 6):
            cin = channels + (k - 1) * grow
            setattr(self, f"conv{k}", nn.Conv2d(cin, grow if k < 5 else channels, 3, padding=1))

    def forward(self, x):
        seen = x
        for k in range(1, 5):
            y = F.leaky_relu(getattr(self, f"conv{k}")(seen), 0.2)
            seen = torch.cat([seen, y], dim=1)
        return x + 0.2 * self.conv5(seen)


class RRDBlock(nn.Module):
    def __init__(self, channels, grow):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (DenseBlock(channels, grow) for _ in range(3))

    def forward(self, x):
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class FuseBlock(nn.Module):
    """`Fuse_sft_block_RRDB`: dec + w · F(cat[enc, dec])."""

    def __init__(self, channels, groups, rrdb_blocks, grow):
        super().__init__()
        self.encode_enc_1 = FusionResBlock(2 * channels, channels, groups)
        self.encode_enc_2 = nn.Sequential(*(RRDBlock(channels, grow) for _ in range(rrdb_blocks)))
        self.encode_enc_3 = FusionResBlock(channels, channels, groups)

    def forward(self, enc, dec, w):
        f = self.encode_enc_3(self.encode_enc_2(self.encode_enc_1(torch.cat([enc, dec], dim=1))))
        return dec + w * f


class TorchCFW(nn.Module):
    """A diffusers AutoencoderKL `vae` plus `fusion_layer_{l}` for l in 1..levels-2."""

    def __init__(self, vae, rrdb_blocks=2, grow=32):
        super().__init__()
        self.vae = vae
        chans = vae.config.block_out_channels
        self.levels = len(chans)
        self.fused = list(range(1, self.levels - 1))
        for level in self.fused:
            setattr(self, f"fusion_layer_{level}",
                    FuseBlock(chans[level], vae.config.norm_num_groups, rrdb_blocks, grow))

    def encode(self, x):
        """-> (moments before the split [B, 2z, h, w], [level-1 map, level-2 map, ...])."""
        enc = self.vae.encoder
        h = enc.conv_in(x)
        features = []
        for level, block in enumerate(enc.down_blocks):
            for resnet in block.resnets:
                h = resnet(h, None)
            if level in self.fused:
                features.append(h)
            for down in block.downsamplers or []:
                h = down(h)
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
        return self.vae.quant_conv(h), features

    def decode(self, z, features, w):
        dec = self.vae.decoder
        h = dec.mid_block(dec.conv_in(self.vae.post_quant_conv(z)))
        for i, block in enumerate(dec.up_blocks):
            for resnet in block.resnets:
                h = resnet(h, None)
            level = self.levels - 1 - i   # LDM numbering: Decoder_Mix runs level 3, 2, 1, 0
            if level in self.fused:
                h = getattr(self, f"fusion_layer_{level}")(features[level - 1], h, w)
            for up in block.upsamplers or []:
                h = up(h)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))

    def ldm_state_dict(self) -> dict:
        """The checkpoint-named state dict (as vqgan_cfw_00011.ckpt's `state_dict`)."""
        vae = {k: v.detach().numpy() for k, v in self.vae.state_dict().items()}
        out = {}
        for ldm, name, how in read_map("ldm_to_diffusers_vae_map.tsv"):
            v = vae[name]
            out[ldm.removeprefix("first_stage_model.")] = (
                v[:, :, None, None] if how.startswith("squeeze") else v)
        assert len(out) == len(vae)
        for level in self.fused:
            for k, v in getattr(self, f"fusion_layer_{level}").state_dict().items():
                out[f"decoder.fusion_layer_{level}.{k}"] = v.detach().numpy()
        return {k: np.ascontiguousarray(v) for k, v in out.items()}
