"""CoSeR training, stage 1 (cognitive adapter) and stage 2 (AiA UNet + ControlNet).

    jaxsr train --config configs/coser_train.py:stage1 --workdir runs/coser1 \\
        --config.init.sd=weights/sd21-base --config.init.open_clip=open_clip_vit_h14.bin \\
        --config.data.source=/data/imagenet512/train.jsonl
    jaxsr train --config configs/coser_train.py:stage2 --workdir runs/coser2 \\
        --config.init.sd=weights/sd21-base --config.init.open_clip=open_clip_vit_h14.bin \\
        --config.init.cognitive=runs/coser1/coser_stage1.safetensors \\
        --config.data.source=/data/imagenet512/train.jsonl
    jaxsr train --config configs/coser_train.py:stage1_tiny --workdir /tmp/c1 \\
        --config.data.source=/tmp/photos/train.jsonl                # CPU, seconds/step

The data source is a JSON-lines manifest beside the images (one line per training
image: its path, captions with weights, same-class references with weights; see
jaxsr/data/tfds_manifest.py). CoSeR's images are 512² (BOX halving, bicubic to a
short side of 512, centre crop: done offline, or on the fly if not). Per step the
GTs are degraded on the device with StableSR's settings (preset "coser").

The released recipe (coser_reference.md section 5):
- stage 1: SRResNet + Q-Former from scratch (Q-Former dropout 0.1), CLIP frozen; MSE
  of E against the caption's 50 text tokens ending at the end token; AdamW (0.9,
  0.999, wd 0.01), lr 5e-5 constant, batch 192, 20k steps, fp32, checkpoint every 750;
- stage 2: every AiA `*_lna` UNet param + the whole ControlNet (459.7M) train, SD
  base, VAE, CLIP and the cognitive encoder frozen; the caption is "" for half the
  batches; AdamW lr 5e-5 (weight decay 0.01, torch's default), no schedule, no EMA,
  batch 192 (4 per GPU × 8 × accumulation 6), 20k steps, fp32, checkpoint every 1200.
Cost: one stage-2 step is about 3 × 2.3 TFLOP per example (UNet-AiA 1.02 + ControlNet
2 × 0.23 forward, backward ≈ 2 × forward for the trained parts), plus 3 VAE encodes.

Variants: "stage1", "stage2" (the real sizes; `init` must name the weights) and
"stage1_tiny", "stage2_tiny" (small random networks, 64² images: tests, smoke runs).
"""

import dataclasses

import ml_collections

from configs import sd2_base

VARIANTS = ("stage1", "stage2", "stage1_tiny", "stage2_tiny")


def _cognitive(tiny: bool) -> dict:
    if not tiny:
        from jaxsr.models.cognitive import COSER_COGNITIVE

        return {k: dataclasses.asdict(getattr(COSER_COGNITIVE, k))
                for k in ("srresnet", "vision", "qformer")}
    # Same structure, laptop size; 50 queries as in CoSeR, so the target slicing is
    # the released one. E's width (32) is the text encoder's and the UNet's context.
    return dict(
        srresnet=dict(num_feat=8, num_block=2, upscale=4),
        vision=dict(image_size=42, patch_size=14, width=32, layers=2, heads=4, mlp_dim=64,
                    output_dim=24),
        qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, encoder_width=24, num_query_tokens=50,
                     vocab_size=40, max_position_embeddings=16),
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "stage1"
    if variant not in VARIANTS:
        raise ValueError(f"coser_train variant must be one of {VARIANTS}, not {variant!r}")
    tiny = variant.endswith("_tiny")
    stage = 1 if variant.startswith("stage1") else 2
    config = ml_collections.ConfigDict()
    config.task = f"coser_stage{stage}"     # jaxsr/train/coser_trainer.py
    config.variant = variant
    config.seed = 0

    model = sd2_base.get_config("tiny" if tiny else "base")
    model.dtype = "float32"                 # the released runs are fp32
    model.cognitive = _cognitive(tiny)
    model.reference_attention = "released"  # or "paper" (jaxsr/models/aia.py)
    if tiny:
        # Fewest layers that still run every part: halves the step's compile time.
        model.unet.layers_per_block = 1
        model.vae.layers_per_block = 1
        model.text_encoder.num_hidden_layers = 2
        model.text_encoder.vocab_size = 128   # the character-level test tokenizer
    config.model = model

    # Where the networks start (see jaxsr/train/coser_trainer.py): "random" in `sd`
    # draws every network at model's sizes (tiny only).
    config.init = dict(sd="random" if tiny else "", tokenizer="", open_clip="", cognitive="")

    config.data = dict(
        source="",          # a CoSeR manifest (JSON lines)
        data_dir="", crop_size=64 if tiny else 512,
        global_batch_size=4 if tiny else 192, shuffle=True, worker_count=0,
    )
    config.degradation = "coser"
    config.grad_accum_steps = 1 if tiny else (1 if stage == 1 else 6)
    # Stage 2: caption → "" for a whole micro-batch with this probability; the LR
    # latent made from the GT instead for a whole micro-batch (StableSR's "no
    # degradation" draw); the frozen Q-Former in train mode (Lightning's train() turns
    # its dropout back on in the released run).
    config.null_text_ratio = 0.5
    config.gt_as_lr_prob = 0.01
    config.adapter_dropout = True
    # Stage 2: recompute the AiA UNet's and the ControlNet's ResNet and transformer
    # layers in the backward pass instead of keeping their activations (the release
    # checkpoints its ControlNet): less memory per image for about one more forward.
    config.remat = False

    config.optim = dict(
        learning_rate=1e-3 if tiny else 5e-5, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.01, grad_clip_norm=0.0,
    )
    config.ema_decay = 0.0
    config.total_steps = 8 if tiny else 20_000

    config.mesh = [("data", -1), ("fsdp", 1)]
    config.sharding = dict(
        trainable=[(".*", "fsdp(axis=fsdp, min_size_mb=0.5)")],
        frozen=[(".*", "replicate")],
    )
    config.log_every = 1 if tiny else 50
    config.checkpoint_every = 4 if tiny else (750 if stage == 1 else 1200)
    config.keep_checkpoints = 3
    if stage == 2:
        # Score SR results of held-out photos (a folder of clean images, centre crops of
        # `size`, degraded once with a fixed key) every `every` steps with `metrics`
        # (jaxsr eval's names), sampled as `jaxsr sr` does with the weights being
        # trained (jaxsr/train/coser_samples.py); logged as eval/<metric> in
        # metrics.jsonl and TensorBoard; 0 turns it off. Metrics with weights (lpips)
        # read them from `metric_weights` (`jaxsr convert --metric` output) and are
        # left out when it is empty.
        config.eval = dict(every=0, source="", count=2, size=64 if tiny else 512,
                           steps=4 if tiny else 50, seed=0, metrics="psnr,ssim,lpips",
                           metric_weights="", crop_border=0, y_channel=False)
    return config
