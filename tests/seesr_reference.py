"""A PyTorch SeeSR UNet/ControlNet reference composed from diffusers building blocks.

SeeSR adds, after every text Transformer2DModel of the cross-attention down, mid
and up blocks, an `image_attentions` Transformer2DModel whose cross-attention reads
the DAPE soft prompt. Here stock diffusers modules get those ModuleLists and
block forwards written from that description; the image context reaches the
blocks through `RCA_CONTEXT`.
"""

import types

import diffusers
import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets import unet_2d_blocks as blocks

RCA_CONTEXT: dict = {}


def _rca_stack(block, img_dim: int, groups: int):
    stack = torch.nn.ModuleList()
    for attn in block.attentions:
        channels = attn.config.in_channels
        heads = attn.config.num_attention_heads
        stack.append(Transformer2DModel(
            num_attention_heads=heads, attention_head_dim=channels // heads, in_channels=channels,
            cross_attention_dim=img_dim, use_linear_projection=True, norm_num_groups=groups))
    block.image_attentions = stack


def _text_then_image(self, attn, img_attn, h, ehs):
    h = attn(h, encoder_hidden_states=ehs, return_dict=False)[0]
    return img_attn(h, encoder_hidden_states=RCA_CONTEXT["image"], return_dict=False)[0]


def _down_forward(self, hidden_states, temb=None, encoder_hidden_states=None, **_):
    outputs = ()
    for resnet, attn, img in zip(self.resnets, self.attentions, self.image_attentions):
        hidden_states = resnet(hidden_states, temb)
        hidden_states = _text_then_image(self, attn, img, hidden_states, encoder_hidden_states)
        outputs += (hidden_states,)
    for down in self.downsamplers or []:
        hidden_states = down(hidden_states)
        outputs += (hidden_states,)
    return hidden_states, outputs


def _mid_forward(self, hidden_states, temb=None, encoder_hidden_states=None, **_):
    hidden_states = self.resnets[0](hidden_states, temb)
    hidden_states = _text_then_image(self, self.attentions[0], self.image_attentions[0],
                                     hidden_states, encoder_hidden_states)
    return self.resnets[1](hidden_states, temb)


def _up_forward(self, hidden_states, res_hidden_states_tuple, temb=None,
                encoder_hidden_states=None, upsample_size=None, **_):
    for resnet, attn, img in zip(self.resnets, self.attentions, self.image_attentions):
        skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
        hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb)
        hidden_states = _text_then_image(self, attn, img, hidden_states, encoder_hidden_states)
    for up in self.upsamplers or []:
        hidden_states = up(hidden_states, upsample_size)
    return hidden_states


def add_rca(model, img_dim: int):
    """Give every cross-attention block of a diffusers UNet/ControlNet its RCA blocks."""
    groups = model.config.norm_num_groups
    parts = list(model.down_blocks) + [model.mid_block] + list(getattr(model, "up_blocks", []))
    for block in parts:
        if not hasattr(block, "attentions"):
            continue
        _rca_stack(block, img_dim, groups)
        forward = {blocks.CrossAttnDownBlock2D: _down_forward,
                   blocks.UNetMidBlock2DCrossAttn: _mid_forward,
                   blocks.CrossAttnUpBlock2D: _up_forward}[type(block)]
        block.forward = types.MethodType(forward, block)
    return model


def seesr_unet(unet_kwargs: dict, img_dim: int):
    return add_rca(diffusers.UNet2DConditionModel(**unet_kwargs), img_dim)


def seesr_controlnet_from_unet(unet, img_dim: int):
    """diffusers' from_unet copies the encoder; SeeSR's copies the RCA blocks too."""
    plain = diffusers.UNet2DConditionModel(**unet.config)
    plain.load_state_dict({k: v for k, v in unet.state_dict().items()
                           if "image_attentions" not in k})
    cn = add_rca(diffusers.ControlNetModel.from_unet(plain), img_dim)
    rca = {k: v for k, v in unet.state_dict().items()
           if "image_attentions" in k and not k.startswith("up_blocks")}
    missing, unexpected = cn.load_state_dict(rca, strict=False)
    assert not unexpected and all("image_attentions" not in k for k in missing)
    return cn
