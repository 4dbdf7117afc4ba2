"""Stable Diffusion 2 base: the UNet, VAE and text encoder every jaxsr model builds on.

    get_config()        the real sizes (stabilityai/stable-diffusion-2-base):
                        UNet 865,910,724 params, VAE 83,653,863, text encoder 340,387,840.
    get_config("tiny")  the same block structure and width ratios (1, 2, 4, 4), so the same
                        checkpoint key names, with small widths; runs on a laptop
                        CPU in seconds and is what the tests and the quickstart use.

Used as the `sd` section of the SeeSR and CoSeR configs; on its own it only
describes architectures (weights come from `jaxsr convert --sd ...`).
"""

import ml_collections


def _sd2_real():
    return dict(
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024, layers_per_block=2, norm_num_groups=32,
            use_linear_projection=True, in_channels=4, out_channels=4, sample_size=64,
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
            latent_channels=4, in_channels=3, out_channels=3, scaling_factor=0.18215,
        ),
        text_encoder=dict(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
    )


def _sd2_tiny():
    return dict(
        unet=dict(
            block_out_channels=(16, 32, 64, 64), attention_head_dim=(1, 2, 4, 4),
            cross_attention_dim=32, layers_per_block=2, norm_num_groups=8,
            use_linear_projection=True, in_channels=4, out_channels=4, sample_size=16,
        ),
        vae=dict(
            block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=4,
            latent_channels=4, in_channels=3, out_channels=3, scaling_factor=0.18215,
        ),
        text_encoder=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=23,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "base"
    if variant not in ("base", "tiny"):
        raise ValueError(f"sd2_base config variant must be 'base' or 'tiny', not {variant!r}")
    sizes = _sd2_real() if variant == "base" else _sd2_tiny()
    config = ml_collections.ConfigDict(sizes)
    config.variant = variant
    # Computation dtype of the networks; parameters stay float32.
    config.dtype = "bfloat16"
    # Attention backend: auto | xla | dpa | cudnn (see jaxsr/nn/attention.py).
    config.attention = "auto"
    config.scheduler = dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon",
    )
    return config
