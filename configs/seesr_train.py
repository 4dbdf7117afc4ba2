"""SeeSR training: ControlNet + the UNet's RCA blocks, everything else frozen.

    jaxsr train --config configs/seesr_train.py --workdir runs/seesr \\
        --config.init.weights=weights/seesr --config.data.source=folder:/data/LSDIR
    jaxsr train --config configs/seesr_train.py:tiny --workdir /tmp/tiny   # seconds/step, CPU

The released recipe (seesr_reference.md section 5): lr 5e-5 constant, AdamW (0.9, 0.999,
wd 1e-2, eps 1e-8), gradient clipping 1.0, 512² crops, global batch 32 (8 GPUs x 2 x
accumulation 2), empty text with probability 0.5, ε-prediction MSE, no EMA. Tags come
from the frozen tagger on the clean image, computed on the fly (no tag files).

Variants: "base" (the real sizes; `init.weights` = a `jaxsr convert --seesr` folder) and
"tiny" (small widths, 64² crops; `init.weights = "random"` draws tiny random weights,
which is what the tests and `jaxsr quickstart` use).
"""

import ml_collections

from configs import seesr, sharding_rules


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "base"
    if variant not in ("base", "tiny"):
        raise ValueError(f"seesr_train variant must be 'base' or 'tiny', not {variant!r}")
    tiny = variant == "tiny"
    config = ml_collections.ConfigDict()
    config.task = "seesr"                   # jaxsr train's trainer (jaxsr/train/seesr_trainer.py)
    config.variant = variant
    config.model = seesr.get_config(variant)
    if tiny:
        # Smallest networks that still run every part: one resnet per UNet level and two
        # text layers halve the train step's compile time; float32 is faster than
        # bfloat16 on CPUs without native bf16 units (the base variant computes in bf16).
        config.model.unet.layers_per_block = 1
        config.model.text_encoder.num_hidden_layers = 2
        config.model.dtype = "float32"
    config.seed = 0

    # Where the networks start. "random" (tiny only): random weights of model's sizes.
    # Otherwise a `jaxsr convert` SeeSR folder; `controlnet_from_unet` re-initialises
    # the ControlNet from the UNet (zero output convs), as a fresh SeeSR run starts.
    config.init = dict(weights="random" if tiny else "", controlnet_from_unet=False)

    config.data = dict(
        # "folder:/path/to/images" (TFDS folder builder) or a TFDS catalog name.
        source="", data_dir="", crop_size=64 if tiny else 512, global_batch_size=8 if tiny else 32,
        shuffle=True, worker_count=0,
    )
    config.degradation = "seesr"            # or "realesrgan" (jaxsr/data/degrade presets)
    config.null_text_ratio = 0.5
    config.grad_accum_steps = 1 if tiny else 2  # the global batch is split into this many
    # Recompute the UNet's and ControlNet's ResNet and transformer layers in the backward
    # pass instead of keeping their activations (SeeSR's --gradient_checkpointing): less
    # HBM per image for about one more forward pass of compute.
    config.remat = False

    config.optim = dict(
        learning_rate=1e-4 if tiny else 5e-5, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=1e-2, grad_clip_norm=1.0,
    )
    config.ema_decay = 0.0                  # 0 turns EMA off (the released recipe)
    config.total_steps = 40 if tiny else 100_000

    # Mesh and sharding (big_vision style). The batch is split over every axis; the
    # trainable params and their optimizer state are FSDP-sharded over 'fsdp', the frozen
    # networks replicated (use 'fsdp' for them too when they do not fit).
    # A 'tensor' axis (e.g. [("data", -1), ("fsdp", 4), ("tensor", 2)]) splits attention
    # heads, the feed-forward width and ResNet channels Megatron-style
    # (configs/sharding_rules.py); without one the rules are plain FSDP.
    config.mesh = [("data", -1), ("fsdp", 1)]
    config.sharding = dict(
        trainable=sharding_rules.tensor_parallel([(".*", "fsdp(axis=fsdp, min_size_mb=0.5)")]),
        frozen=[(".*", "replicate")],
    )
    # The frozen networks (UNet, VAE, text encoder, DAPE) are held in this dtype; the
    # base variant computes in bfloat16, so holding them in bfloat16 halves their
    # memory (kernels are cast to the compute dtype at use either way).
    config.frozen_dtype = config.model.dtype

    config.log_every = 5 if tiny else 50
    config.checkpoint_every = 20 if tiny else 2000
    config.keep_checkpoints = 3
    # Sample SR images of a few held-out photos (a folder of clean images, centre
    # crops of `size`, degraded once with a fixed key) every `every` steps, written to
    # WORKDIR/samples/ and TensorBoard; 0 turns it off.
    config.samples = dict(every=0, source="", count=2, size=128 if tiny else 512,
                          steps=20 if tiny else 50, seed=0)
    # Score SR results of held-out photos (chosen and degraded as the samples are) every
    # `every` steps with `metrics` (jaxsr eval's names), logged as eval/<metric> in
    # metrics.jsonl and TensorBoard; 0 turns it off. Metrics with weights (lpips) read
    # them from `metric_weights` (`jaxsr convert --metric` output) and are left out
    # when it is empty.
    config.eval = dict(every=0, source="", count=2, size=128 if tiny else 512,
                       steps=20 if tiny else 50, seed=0, metrics="psnr,ssim,lpips",
                       metric_weights="", crop_border=0, y_channel=False)
    return config
