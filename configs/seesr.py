"""SeeSR: SD2-base UNet + ControlNet, both with RCA, and the DAPE prompt extractor.

    get_config()        the released model's sizes: UNet 1,126,760,324 params
                        (SD2's 865,910,724 + 16 RCA blocks), ControlNet 489,031,440,
                        DAPE = RAM Swin-L 384 + Query2Label head (+ LoRA r=8).
    get_config("tiny")  the same structure with small widths (tests, quickstart).

Weights: `jaxsr convert --sd SD2 --seesr SEESR --ram RAM.pth --dape DAPE.pth --output DIR`.
"""

import ml_collections

from configs import sd2_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "base"
    config = sd2_base.get_config(variant)
    config.unet.use_image_cross_attention = True
    config.unet.image_cross_attention_dim = 512
    config.controlnet = dict(
        conditioning_embedding_out_channels=(16, 32, 96, 256),
        conditioning_scale=1.0,
    )
    if variant == "base":
        config.dape = dict(
            img_size=384, patch_size=4, embed_dim=192, depths=(2, 2, 18, 2),
            num_heads=(6, 12, 24, 48), window_size=12, num_classes=4585, embed_width=512,
            head_width=768, head_layers=2, head_heads=4, head_intermediate=3072,
            lora_rank=8, lora_alpha=1.0,
        )
    else:
        config.unet.image_cross_attention_dim = 16
        config.dape = dict(
            img_size=96, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2),
            num_heads=(1, 2, 2, 4), window_size=3, num_classes=4585, embed_width=16,
            head_width=32, head_layers=2, head_heads=4, head_intermediate=64,
            lora_rank=8, lora_alpha=1.0,
        )
    # Prompts and sampling defaults of the released test script.
    config.prompt = dict(
        added_prompt="clean, high-resolution, 8k",
        negative_prompt="dotted, noise, blur, lowres, smooth",
    )
    config.sampling = dict(
        sampler="ddpm", steps=50, guidance_scale=5.5, start_timestep=999, color_fix="adain",
        latent_tile=96, latent_tile_overlap=4, vae_encoder_tile=1024, vae_decoder_tile=224,
        upscale=4, process_size=512,
    )
    return config
