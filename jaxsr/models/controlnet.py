"""diffusers' ControlNetModel in Flax, with SeeSR's RCA blocks.

The ControlNet is the UNet's encoder half (same `conv_in`, `time_embedding`,
`down_blocks_i`, `mid_block` modules and names, built from unet.py's blocks)
plus a small conv stack that embeds the pixel-space condition image, and one
zero-initialised 1×1 conv per encoder output. With `use_image_cross_attention`
the encoder's transformers are followed by RCA blocks, as in SeeSR's UNet.

Shapes (NHWC): sample [B, h, w, 4] latents, controlnet_cond [B, 8h, 8w, 3] RGB in
[0, 1] (SeeSR: the bicubic-upscaled LR, not normalised), encoder_hidden_states
[B, 77, 1024], image_encoder_hidden_states [B, 145, 512].
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsr.models.unet import MidBlock, UNetConfig, embed_timesteps, encoder_blocks
from jaxsr.nn.layers import conv

_DOWN_TO_UP = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}

# Settings of a diffusers ControlNet config that jaxsr does not implement, with the
# only value accepted (None: absent or null).
_UNSUPPORTED = {
    "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False,
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_class_embeds": None, "only_cross_attention": False,
    "upcast_attention": False, "resnet_time_scale_shift": "default",
    "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu",
    "transformer_layers_per_block": 1, "downsample_padding": 1, "mid_block_scale_factor": 1,
}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """The diffusers ControlNetModel config fields jaxsr uses (same names and meaning;
    SD2-base / SeeSR values as defaults). `attention_head_dim` is the number of heads
    per level, as in SD2's config; `num_attention_heads` overrides it when set."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: tuple[int, ...] = (5, 10, 20, 20)
    num_attention_heads: tuple[int, ...] | None = None
    cross_attention_dim: int = 1024
    use_linear_projection: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    # SeeSR: representation cross-attention after every text transformer.
    use_image_cross_attention: bool = False
    image_cross_attention_dim: int = 512

    def __post_init__(self):
        if self.controlnet_conditioning_channel_order != "rgb":
            raise ValueError("ControlNetConfig: only controlnet_conditioning_channel_order='rgb' "
                             "is supported")
        if self.global_pool_conditions:
            raise ValueError("ControlNetConfig: global_pool_conditions=True is not supported")
        if not self.conditioning_embedding_out_channels:
            raise ValueError("ControlNetConfig: conditioning_embedding_out_channels is empty")
        self.block_config()  # validates the shared encoder fields

    def block_config(self) -> UNetConfig:
        """The UNetConfig whose down/mid blocks this ControlNet shares (up types mirrored,
        unused here but required by UNetConfig's checks)."""
        bad = [t for t in self.down_block_types if t not in _DOWN_TO_UP]
        if bad:
            raise ValueError(f"unsupported ControlNet down block types {bad}")
        return UNetConfig(
            in_channels=self.in_channels, block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block, down_block_types=self.down_block_types,
            up_block_types=tuple(_DOWN_TO_UP[t] for t in self.down_block_types[::-1]),
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            cross_attention_dim=self.cross_attention_dim,
            use_linear_projection=self.use_linear_projection,
            norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps,
            flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift,
            use_image_cross_attention=self.use_image_cross_attention,
            image_cross_attention_dim=self.image_cross_attention_dim)

    @property
    def heads(self) -> tuple[int, ...]:
        return self.block_config().heads

    @property
    def condition_downscale(self) -> int:
        """How much smaller the latent is than the condition image (8 for SD)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet_config(cls, unet: UNetConfig, **overrides) -> ControlNetConfig:
        """The ControlNet `ControlNetModel.from_unet` builds for this UNet (encoder
        fields copied, RCA included when the UNet has it)."""
        shared = {f.name for f in dataclasses.fields(cls)} & {
            f.name for f in dataclasses.fields(UNetConfig)}
        return cls(**{**{k: getattr(unet, k) for k in shared}, **overrides})

    @classmethod
    def from_diffusers_config(cls, d: dict) -> ControlNetConfig:
        """Build from a diffusers `controlnet/config.json` dict; unknown keys are
        ignored, settings jaxsr does not implement are refused."""
        for key, only in _UNSUPPORTED.items():
            if key in d and d[key] is not None and d[key] != only:
                raise ValueError(f"controlnet config: {key}={d[key]!r} is not supported "
                                 f"(only {only!r})")
        if "conditioning_embedding_out_channels" in d and not d[
                "conditioning_embedding_out_channels"]:
            raise ValueError("controlnet config: conditioning_embedding_out_channels must be set")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
        for name in ("attention_head_dim", "num_attention_heads"):
            if isinstance(kw.get(name), int):
                kw[name] = (kw[name],) * len(kw.get("block_out_channels",
                                                    cls.block_out_channels))
        return cls(**kw)

    def to_diffusers_config(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v)
             for k, v in dataclasses.asdict(self).items()}
        if not self.use_image_cross_attention:
            d.pop("use_image_cross_attention")
            d.pop("image_cross_attention_dim")
        d.update({"_class_name": "ControlNetModel", "act_fn": "silu", "downsample_padding": 1,
                  "mid_block_scale_factor": 1, "only_cross_attention": False,
                  "upcast_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
                  "resnet_time_scale_shift": "default"})
        return d


SEESR_CONTROLNET = ControlNetConfig(use_image_cross_attention=True)


class ControlNetConditioningEmbedding(nn.Module):
    """conv_in → SiLU → (blocks_{2i}: same width, blocks_{2i+1}: stride 2, wider, each
    followed by SiLU) → conv_out (zero-init). [B, H, W, 3] → [B, H/8, W/8, out]."""

    channels: tuple[int, ...]
    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dt = self.dtype
        h = nn.silu(conv(self.channels[0], "conv_in", dtype=dt)(x))
        for i, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
            h = nn.silu(conv(c_in, f"blocks_{2 * i}", dtype=dt)(h))
            h = nn.silu(conv(c_out, f"blocks_{2 * i + 1}", stride=2, dtype=dt)(h))
        return nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dt,
                       kernel_init=nn.initializers.zeros, name="conv_out")(h)


def _zero_conv(features: int, name: str, dtype) -> nn.Conv:
    """diffusers' zero_module(Conv2d(c, c, 1)): the ControlNet output projections."""
    return nn.Conv(features, (1, 1), padding="VALID", dtype=dtype,
                   kernel_init=nn.initializers.zeros, name=name)


class ControlNetModel(nn.Module):
    """Returns (down residuals, mid residual), each multiplied by `conditioning_scale`
    and in the compute dtype: one down residual per UNet skip (12 for SD2), shapes
    [B, h/2^k, w/2^k, C_level], and mid [B, h/2^(L-1), w/2^(L-1), C_last]. `remat`
    rematerialises every ResNet and transformer layer in the backward pass."""

    config: ControlNetConfig = SEESR_CONTROLNET
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond,
                 image_encoder_hidden_states=None, conditioning_scale=1.0):
        cfg, dt = self.config, self.dtype
        if cfg.use_image_cross_attention and image_encoder_hidden_states is None:
            raise ValueError("this ControlNet has RCA blocks: pass image_encoder_hidden_states")
        f = cfg.condition_downscale
        if controlnet_cond.shape[1:3] != (sample.shape[1] * f, sample.shape[2] * f):
            raise ValueError(f"controlnet_cond {controlnet_cond.shape} must be {f}x the latent "
                             f"{sample.shape} in height and width")
        temb = embed_timesteps(cfg, sample.shape[0], timesteps, dt)
        ctx = encoder_hidden_states.astype(dt)
        img_ctx = None
        if image_encoder_hidden_states is not None:
            img_ctx = image_encoder_hidden_states.astype(dt)

        chans, heads = cfg.block_out_channels, cfg.heads
        h = conv(chans[0], "conv_in", dtype=dt)(sample.astype(dt))
        h = h + ControlNetConditioningEmbedding(
            tuple(cfg.conditioning_embedding_out_channels), chans[0], dt,
            name="controlnet_cond_embedding")(controlnet_cond.astype(dt))

        block = dict(config=cfg.block_config(), attention=self.attention, dtype=dt,
                     remat=self.remat)
        h, skips = encoder_blocks(block["config"], h, temb, ctx, img_ctx, dtype=dt,
                                  attention=self.attention, remat=self.remat)
        h = MidBlock(channels=chans[-1], heads=heads[-1], with_attention=True, name="mid_block",
                     **block)(h, temb, ctx, img_ctx)

        scale = jnp.asarray(conditioning_scale, dt)
        down = tuple(_zero_conv(s.shape[-1], f"controlnet_down_blocks_{k}", dt)(s) * scale
                     for k, s in enumerate(skips))
        mid = _zero_conv(chans[-1], "controlnet_mid_block", dt)(h) * scale
        return down, mid


def dummy_inputs(config: ControlNetConfig, batch: int = 1, size: int = 8):
    """Inputs of the right ranks for `init`/`eval_shape` (size: latent side)."""
    size = max(size, 2 ** (len(config.block_out_channels) - 1))
    f = config.condition_downscale
    sample = jnp.zeros((batch, size, size, config.in_channels), jnp.float32)
    ctx = jnp.zeros((batch, 77, config.cross_attention_dim), jnp.float32)
    cond = jnp.zeros((batch, size * f, size * f, config.conditioning_channels), jnp.float32)
    img = None
    if config.use_image_cross_attention:
        img = jnp.zeros((batch, 145, config.image_cross_attention_dim), jnp.float32)
    return sample, jnp.zeros((batch,), jnp.int32), ctx, cond, img


def param_shapes(config: ControlNetConfig):
    """The Flax param tree's shapes (ShapeDtypeStructs), without allocating it."""
    model = ControlNetModel(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))
    return shapes["params"]
