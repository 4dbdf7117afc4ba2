"""CoSeR: SD-2.1-base with All-in-Attention, CoSeR's ControlNet, the cognitive encoder
(MSRResNet -> OpenCLIP ViT-H/14 tokens -> Q-Former) and StableSR's CFW decoder (whose
shape is read off its checkpoint).

    get_config()        the released model's sizes: AiA UNet 981,533,764 params,
                        ControlNet 344,121,280, MSRResNet 1,517,571, ViT-H/14 vision
                        tower 632,076,800, Q-Former 258,582,528, CFW fusion 44,393,728.
    get_config("tiny")  the same structure with small widths (tests, benchmarks on CPU);
                        the same checkpoint key names, so a tiny release converts with
                        the same rules.

Architecture fields are what tensor shapes cannot tell (head counts, norm groups,
Q-Former cross-attention frequency, ...). `jaxsr convert --coser ... --config
configs/coser.py:tiny` reads them; the converted folder stores the resulting module
configs, so inference needs no config file. `sampling` holds CoSeR's
scripts/inference.py defaults.

Weights: `jaxsr convert --coser CoSeR.ckpt --qformer QF.ckpt --sd v2-1_512-ema-pruned.ckpt
[--cfw vqgan_cfw_00011.ckpt] --output DIR`.
"""

import ml_collections

from configs import sd2_base

NEGATIVE_PROMPT = (
    "worst quality, normal quality, low quality, low res, blurry, text, watermark, logo, "
    "banner, extra digits, cropped, jpeg artifacts, signature, username, error, sketch ,"
    "duplicate, ugly, monochrome, horror, geometry, mutation, disgusting")


def _cognitive(variant: str) -> dict:
    if variant == "base":
        return dict(
            srresnet=dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=16, upscale=4),
            vision=dict(image_size=224, patch_size=14, width=1280, layers=32, heads=16,
                        mlp_dim=5120, output_dim=1024, layer_norm_eps=1e-5),
            qformer=dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
                         intermediate_size=3072, encoder_width=1024, cross_attention_freq=2,
                         num_query_tokens=50, vocab_size=30522, max_position_embeddings=512,
                         layer_norm_eps=1e-12))
    # Four Q-Former layers (cross-attention in 0 and 2), a two-block 42 px ViT
    # (3×3 patches + CLS), a two-block SRResNet; E is 32 wide like the tiny text encoder.
    return dict(
        srresnet=dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=4),
        vision=dict(image_size=42, patch_size=14, width=32, layers=2, heads=4, mlp_dim=64,
                    output_dim=24, layer_norm_eps=1e-5),
        qformer=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=48, encoder_width=24, cross_attention_freq=2,
                     num_query_tokens=6, vocab_size=40, max_position_embeddings=16,
                     layer_norm_eps=1e-12))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "base"
    config = sd2_base.get_config(variant)          # unet (the AiA base), vae, text_encoder
    config.model = "coser"
    # "released": hard first-max selection scaled by the raw max logit, unprojected
    # reference keys/values (what the released weights were trained with);
    # "paper": projected keys/values and a straight-through one-hot (new training).
    config.reference_attention = "released"
    # ControlNet encoder levels that keep their transformers (LDM attention_resolutions
    # [4, 3, 1]: none at the second level).
    config.controlnet = dict(attention_levels=(0, 2))
    config.cognitive = _cognitive(variant)
    config.sampling = dict(
        steps=50, guidance_scale=3.0, reference_guidance_scale=3.0, color_fix="none",
        fusion_weight=0.5, seed=2887, prompt="", negative_prompt=NEGATIVE_PROMPT,
        upscale=4,
        # The final decoder: "cfw" (StableSR's CFW autoencoder, on in the release) or
        # "vae" (the plain SD decoder, the original's --wocfw). `jaxsr sr` uses CFW when
        # the weights folder has it (--decoder); `jaxsr plan` compiles this one.
        decoder="cfw",
        # Large images: latent tiles with Gaussian blending (inference_tile.py's grid).
        latent_tile=64, latent_tile_overlap=32,
        # `jaxsr plan`'s program: "reference" (one pass with reference generation),
        # "tiled" (inference_tile.py's per-patch call, enlarged patches of patch_size²
        # every patch_stride pixels, after enlarging the LR's short side to input_size)
        # or "auto" (tiled above (8·latent_tile)² outputs, as `jaxsr sr --coser` picks).
        mode="auto", input_size=512, patch_size=1280, patch_stride=1000,
    )
    return config
