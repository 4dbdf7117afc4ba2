"""DAPE distillation: RAM + LoRA learns to tag degraded images as RAM tags clean ones.

    jaxsr train --config configs/dape_train.py --workdir runs/dape \\
        --config.init.ram=weights/ram_swin_large_14m.pth --config.data.source=coco
    jaxsr train --config configs/dape_train.py:tiny --workdir /tmp/dape_tiny   # CPU, seconds

The released recipe (seesr_reference.md section 4): the student is RAM (Swin-L 384) with
loralib LoRA r=8, alpha 1 on the Swin qkv (q, v rows) and the tagging head's
cross-attention query/key, in train mode (drop-path 0.1, dropout 0.1); the teacher is
the frozen RAM; loss = MSE of the soft prompts + BCE of the student's tag
probabilities against the teacher's; AdamW lr 1e-4, betas (0.9, 0.999), weight decay
0, no gradient clipping; 50 warm-up steps, the rate halved at 20k and 30k of 300k
steps; batch 8; no EMA. Training pairs: whole COCO images resized to 512² (Lanczos),
degraded on the fly with SeeSR's second-order pipeline.

At the end the trained LoRA is written to WORKDIR/dape_lora.safetensors (DAPE.pth's
layout); `jaxsr convert ... --ram RAM.pth --dape WORKDIR/dape_lora.safetensors` uses it.

Variants: "base" (needs init.ram) and "tiny" (small random RAM, 64² images).
"""

import ml_collections

from configs import seesr


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "base"
    if variant not in ("base", "tiny"):
        raise ValueError(f"dape_train variant must be 'base' or 'tiny', not {variant!r}")
    tiny = variant == "tiny"
    config = ml_collections.ConfigDict()
    config.task = "dape"
    config.variant = variant
    config.seed = 10                        # the released manual_seed
    # The RAM architecture is read from the checkpoint; model.dape gives the sizes of
    # the random weights of init.ram = "random" (the tiny variant).
    config.model = dict(dtype="float32", attention="auto", lora_rank=8, lora_alpha=1.0,
                        dape=seesr.get_config(variant).dape.to_dict())
    config.init = dict(ram="random" if tiny else "")

    config.data = dict(
        # "folder:/path/to/images" (TFDS folder builder) or a TFDS catalog name ("coco").
        source="", data_dir="", crop_size=64 if tiny else 512, global_batch_size=8,
        shuffle=True, worker_count=0, augment="resize",
    )
    config.degradation = "seesr"
    config.bce_weight = 1.0
    config.grad_accum_steps = 1

    config.optim = dict(
        learning_rate=1e-4, warmup_steps=0 if tiny else 50, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.0, grad_clip_norm=0.0, milestones=[] if tiny else [20_000, 30_000],
        gamma=0.5,
    )
    config.ema_decay = 0.0
    config.total_steps = 30 if tiny else 300_000

    # The LoRA tensors are small (~6 M params for Swin-L): replicated; the frozen RAM
    # too (use 'fsdp' for it on small-memory devices).
    config.mesh = [("data", -1), ("fsdp", 1)]
    config.sharding = dict(
        trainable=[(".*", "fsdp(axis=fsdp, min_size_mb=0.5)")],
        frozen=[(".*", "replicate")],
    )

    config.log_every = 5 if tiny else 50
    config.checkpoint_every = 10 if tiny else 1000
    config.keep_checkpoints = 3
    return config
