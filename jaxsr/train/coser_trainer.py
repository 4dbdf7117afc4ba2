"""Train CoSeR: stage 1 (cognitive adapter) and stage 2 (AiA UNet + ControlNet).

    result = train(config, workdir)     # configs/coser_train.py; config.task picks the stage

This file says what each stage trains (weights, the trainable / frozen split, the
loss of `coser_objective`, the input of `jaxsr.data.coser_input`) and how the results
leave: stage 1 writes WORKDIR/coser_stage1.safetensors, the SRResNet and the whole
Q-Former under CoSeR's names (`pre_sr_model.*`, `global_adapter.*`), which stage 2
reads as `init.cognitive` (as it reads the released Q-Former checkpoint); stage 2
writes WORKDIR/coser_weights/, a folder `jaxsr sr` and CoSeRPipeline load (the
format of `jaxsr convert --coser`), and scores held-out photos every config.eval.every
steps (jaxsr/train/coser_samples.py). `jaxsr.train.loop.run`
is the loop.

Weights (config.init):
  sd:        SD-2.1-base (a diffusers folder, or an original single file with
             `tokenizer` given): text encoder + tokenizer (both stages), UNet and VAE
             (stage 2: the AiA UNet and the ControlNet start from the SD UNet).
  open_clip: open_clip's ViT-H/14 laion2b_s32b_b79k weights (`visual.*`), the
             vision tower, unless `cognitive` holds one.
  cognitive: a stage-1 result or CoSeR checkpoint (pre_sr_model + global_adapter);
             required by stage 2; stage 1 starts from it when given, else from a
             fresh SRResNet and Q-Former.
  "random" in `sd` (the tiny variants): every network random at config.model's
             sizes, with a character-level tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.diffusion.schedule import SchedulerConfig
from jaxsr.models import clip_text, unet, vae
from jaxsr.models.clip_vision import CLIPVisionConfig
from jaxsr.models.cognitive import CognitiveConfig, CognitiveEncoder
from jaxsr.models.coser_controlnet import CoSeRControlNet, CoSeRControlNetConfig
from jaxsr.models.coser_unet import CoSeRUNet, CoSeRUNetConfig
from jaxsr.models.qformer import QFormerConfig
from jaxsr.models.srresnet import SRResNetConfig
from jaxsr.train import coser_objective as obj
from jaxsr.train.export import export_coser, gather_to_host
from jaxsr.train.loop import EXIT_TERMINATED, Task, TrainResult, run

__all__ = ["EXIT_TERMINATED", "STAGE1_FILE", "STAGE2_FOLDER", "TrainResult", "coser_task",
           "train", "weight_shapes"]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STAGE1_FILE = "coser_stage1.safetensors"
STAGE2_FOLDER = "coser_weights"
STAGES = {"coser_stage1": 1, "coser_stage2": 2}


@dataclasses.dataclass
class StageWeights:
    """Host params (float32 numpy) and configs of every network a stage uses."""

    cognitive_config: CognitiveConfig
    cognitive: dict                 # {"pre_sr_model", "visual", "global_adapter"}
    text_config: clip_text.CLIPTextConfig
    text_encoder: dict
    tokenizer: object
    sd_unet: tuple | None = None    # (UNetConfig, params): stage 2
    vae: tuple | None = None        # (VAEConfig, params): stage 2


def stage_of(config) -> int:
    if config.task not in STAGES:
        raise ValueError(f"config.task {config.task!r} is not one of {sorted(STAGES)}")
    return STAGES[config.task]


def cognitive_config(config) -> CognitiveConfig:
    c = config.model.cognitive
    return CognitiveConfig(srresnet=SRResNetConfig(**dict(c.srresnet)),
                           vision=CLIPVisionConfig(**dict(c.vision)),
                           qformer=QFormerConfig(**dict(c.qformer)))


def fresh_cognitive(cfg: CognitiveConfig, seed: int) -> dict:
    """The modules' own initialisers (the Q-Former's N(0, 0.02²) BERT init): a stage-1
    run from scratch."""
    lr = jnp.zeros((1, 8, 8, 3), jnp.float32)
    params = jax.jit(CognitiveEncoder(cfg).init)(jax.random.key(seed), lr)["params"]
    return jax.tree.map(np.asarray, params)


def weight_shapes(config, stage: int) -> StageWeights:
    """StageWeights whose params are ShapeDtypeStructs at config.model's sizes (nothing
    read or drawn): what `jaxsr plan` compiles. The base variants' sizes are
    SD-2.1-base's, open_clip's ViT-H/14 and CoSeR's SRResNet and Q-Former, the
    architectures `init` names; the tokenizer is the test one (only the ids of "" come
    from it, a constant of the program)."""
    from jaxsr.demo import demo_tokenizer
    from jaxsr.models import cognitive

    m = config.model
    cog_cfg = cognitive_config(config)
    text_cfg = clip_text.CLIPTextConfig(**dict(m.text_encoder))
    weights = StageWeights(cog_cfg, cognitive.param_shapes(cog_cfg), text_cfg,
                           clip_text.param_shapes(text_cfg), demo_tokenizer())
    if stage == 2:
        unet_cfg = unet.UNetConfig(**dict(m.unet))
        vae_cfg = vae.VAEConfig(**dict(m.vae))
        weights.sd_unet = (unet_cfg, unet.param_shapes(unet_cfg))
        weights.vae = (vae_cfg, vae.param_shapes(vae_cfg))
    return weights


def _random_weights(config, stage: int) -> StageWeights:
    from jaxsr.demo import demo_tokenizer, random_params

    m, seed = config.model, config.seed
    cog_cfg = cognitive_config(config)
    cog = fresh_cognitive(cog_cfg, seed)
    if stage == 2:     # a "trained" cognitive encoder: random, every tensor non-zero
        cog = random_params(CognitiveEncoder(cog_cfg), np.zeros((1, 8, 8, 3), np.float32),
                            seed=seed + 1)
    text_cfg = clip_text.CLIPTextConfig(**dict(m.text_encoder))
    text = random_params(clip_text.CLIPTextModel(text_cfg), np.zeros((1, 77), np.int32),
                         seed=seed + 2)
    weights = StageWeights(cog_cfg, cog, text_cfg, text, demo_tokenizer())
    if stage == 2:
        unet_cfg = unet.UNetConfig(**dict(m.unet))
        vae_cfg = vae.VAEConfig(**dict(m.vae))
        weights.sd_unet = (unet_cfg, random_params(unet.UNet2DConditionModel(unet_cfg),
                                                   *unet.dummy_inputs(unet_cfg), seed=seed + 3))
        weights.vae = (vae_cfg, random_params(vae.AutoencoderKL(vae_cfg),
                                              vae.dummy_image(vae_cfg), seed=seed + 4))
    return weights


def load_weights(config, stage: int) -> StageWeights:
    """config.init -> StageWeights (see the module docstring)."""
    init = config.init
    if not init.sd:
        raise ValueError("config.init.sd is empty: give SD-2.1-base (a diffusers folder or "
                         "a single file), or 'random' for the tiny variants")
    if init.sd == "random":
        return _random_weights(config, stage)
    from jaxsr.convert.coser_cognitive import (
        OPEN_CLIP_VISUAL_PREFIX,
        VISUAL_PREFIX,
        load_clip_vision,
        load_qformer,
        load_srresnet,
    )
    from jaxsr.convert.readers import read_state_dict
    from jaxsr.convert.sd2 import load_sd2
    from jaxsr.models.tokenizer import load_tokenizer

    sd = load_sd2(init.sd)
    tok_dir = init.get("tokenizer") or sd.tokenizer_dir
    if tok_dir is None:
        raise FileNotFoundError(f"{init.sd} has no tokenizer/ folder: set config.init."
                                "tokenizer to SD-2.1's tokenizer folder")
    cog_cfg = cognitive_config(config)
    if stage == 2 and not init.cognitive:
        raise ValueError("stage 2 needs config.init.cognitive: the stage-1 result "
                         f"(WORKDIR/{STAGE1_FILE}) or CoSeR's Q-Former checkpoint")
    state = read_state_dict(init.cognitive) if init.cognitive else {}
    if state:
        cog = {"pre_sr_model": load_srresnet(state, cog_cfg.srresnet),
               "global_adapter": load_qformer(state, cog_cfg.qformer)}
    else:
        fresh = fresh_cognitive(cog_cfg, config.seed)
        cog = {k: fresh[k] for k in ("pre_sr_model", "global_adapter")}
    if any(k.startswith(VISUAL_PREFIX) for k in state):
        cog["visual"] = load_clip_vision(state, cog_cfg.vision)
    elif init.open_clip:
        cog["visual"] = load_clip_vision(read_state_dict(init.open_clip), cog_cfg.vision,
                                         prefix=OPEN_CLIP_VISUAL_PREFIX)
    else:
        raise ValueError("config.init.open_clip is empty: give open_clip's ViT-H-14 "
                         "laion2b_s32b_b79k weights (the frozen vision tower)")
    as32 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
    return StageWeights(cog_cfg, as32(cog), sd.text_encoder[0], as32(sd.text_encoder[1]),
                        load_tokenizer(tok_dir),
                        sd_unet=(sd.unet[0], sd.unet[1]) if stage == 2 else None,
                        vae=(sd.vae[0], as32(sd.vae[1])) if stage == 2 else None)


def _check_widths(weights: StageWeights) -> None:
    q = weights.cognitive_config.qformer
    if weights.text_config.hidden_size != q.hidden_size:
        raise ValueError(f"the text encoder's width {weights.text_config.hidden_size} must "
                         f"equal the Q-Former's {q.hidden_size} (E is trained to match it)")


# ----------------------------------------------------------------- stage 1


def export_stage1(trainable, unused_qformer, path, *, step: int | None = None) -> Path:
    """SRResNet + the whole Q-Former under CoSeR's checkpoint names (process 0 writes)."""
    from jaxsr.convert.coser_cognitive import PRE_SR_PREFIX, QFORMER_PREFIX
    from jaxsr.convert.safetensors_io import write_safetensors
    from jaxsr.convert.tree import flax_to_torch

    host = gather_to_host(trainable)
    qformer = obj.merge(host["global_adapter"], unused_qformer)
    tensors = {}
    for prefix, tree in ((PRE_SR_PREFIX, host["pre_sr_model"]), (QFORMER_PREFIX, qformer)):
        for key, value in flax_to_torch(tree).items():
            tensors[prefix + key.lstrip(".")] = value   # top-level leaves: ".query_tokens"
    path = Path(path)
    if jax.process_index() == 0:
        write_safetensors(path, tensors, metadata={"format": "pt", "train_step": step,
                                                   "source": "jaxsr CoSeR stage 1"})
    return path


def stage1_task(config, workdir, weights: StageWeights, degrade_fn) -> Task:
    dt, att = _DTYPES[config.model.dtype], config.model.attention
    nets = obj.Stage1Nets(
        cognitive=CognitiveEncoder(weights.cognitive_config, attention=att, dtype=dt),
        text_encoder=clip_text.CLIPTextModel(weights.text_config, dtype=dt, attention=att))
    used, unused = obj.split_qformer(weights.cognitive["global_adapter"])
    trainable = {"pre_sr_model": weights.cognitive["pre_sr_model"], "global_adapter": used}
    frozen = {"visual": weights.cognitive["visual"], "text_encoder": weights.text_encoder}

    def loss_fn(params, frozen, hr, keys, ids):
        return obj.stage1_loss(nets, params, frozen, hr, keys, degrade_fn, ids), {}

    def finish(state, step):
        out = export_stage1(state.params, unused, Path(workdir) / STAGE1_FILE, step=step)
        if jax.process_index() == 0:
            print(f"wrote the trained SRResNet and Q-Former to {out} (stage 2: "
                  f"--config.init.cognitive={out})", flush=True)

    return Task(trainable=trainable, frozen=frozen, loss_fn=loss_fn, finish=finish,
                extra_inputs={"ids": ((77,), jnp.int32)})


# ----------------------------------------------------------------- stage 2


def stage2_nets(config, weights: StageWeights) -> obj.Stage2Nets:
    from jaxsr.models.tokenizer import tokenize

    dt, att = _DTYPES[config.model.dtype], config.model.attention
    remat = bool(config.get("remat", False))
    base = weights.sd_unet[0]
    ucfg = CoSeRUNetConfig(base=base, reference_attention=config.model.reference_attention)
    sched = SchedulerConfig.from_diffusers(dict(config.model.scheduler), "ddpm")
    return obj.Stage2Nets(
        cognitive=CognitiveEncoder(weights.cognitive_config, attention=att, dtype=dt),
        text_encoder=clip_text.CLIPTextModel(weights.text_config, dtype=dt, attention=att),
        unet=CoSeRUNet(ucfg, dtype=dt, attention=att, remat=remat),
        controlnet=CoSeRControlNet(CoSeRControlNetConfig(base=base), dtype=dt, attention=att,
                                   remat=remat),
        vae=vae.AutoencoderKL(weights.vae[0], dtype=dt, attention=att),
        alphas_cumprod=sched.alphas_cumprod(),
        empty_ids=tokenize(weights.tokenizer, "")[0])


def stage2_params(nets: obj.Stage2Nets, weights: StageWeights, seed: int) -> tuple[dict, dict]:
    """(trainable {"unet_lna", "controlnet"}, frozen {"unet", "vae", "text_encoder",
    "cognitive"}), the AiA UNet and the ControlNet initialised from SD (coser_init).
    From `weight_shapes` (abstract SD params) the result is abstract too."""
    from jaxsr.convert.coser_init import aia_unet_params_from_sd, controlnet_params_from_sd

    def from_sd(sd_params):
        return (aia_unet_params_from_sd(sd_params, nets.unet.config, jax.random.key(seed)),
                controlnet_params_from_sd(sd_params, nets.controlnet.config))

    sd_params = weights.sd_unet[1]
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(sd_params)):
        host = lambda tree: tree
        aia, cn = jax.eval_shape(from_sd, sd_params)
    else:
        host = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
        aia, cn = from_sd(sd_params)
    base, lna = obj.split_lna(host(aia))
    cog = {k: weights.cognitive[k] for k in ("pre_sr_model", "visual")}
    cog["global_adapter"] = obj.split_qformer(weights.cognitive["global_adapter"])[0]
    trainable = {"unet_lna": lna, "controlnet": host(cn)}
    frozen = {"unet": base, "vae": weights.vae[1], "text_encoder": weights.text_encoder,
              "cognitive": cog}
    return trainable, frozen


def stage2_task(config, workdir, weights: StageWeights, degrade_fn, sharpen_reference) -> Task:
    nets = stage2_nets(config, weights)
    trainable, frozen = stage2_params(nets, weights, config.seed)
    s = config.data.crop_size
    kw = dict(drop_prob=float(config.null_text_ratio),
              gt_as_lr_prob=float(config.gt_as_lr_prob),
              adapter_dropout=bool(config.adapter_dropout), sharpen_reference=sharpen_reference)

    def loss_fn(params, frozen, hr, keys, ids, ref):
        ref = ref.astype(jnp.float32) / 255.0
        return obj.stage2_loss(nets, params, frozen, hr, keys, degrade_fn, ref, ids, **kw)

    base_unet = frozen["unet"]

    def finish(state, step):
        from jaxsr.convert.coser_weights import CoSeRArchitecture

        arch = CoSeRArchitecture(unet=nets.unet.config, controlnet=nets.controlnet.config,
                                 vae=weights.vae[0], text_encoder=weights.text_config,
                                 cognitive=weights.cognitive_config)
        trained = {"unet": obj.merge(base_unet, gather_to_host(state.params["unet_lna"])),
                   "controlnet": state.params["controlnet"], "vae": weights.vae[1],
                   "text_encoder": weights.text_encoder, "cognitive": weights.cognitive}
        out = export_coser(arch, trained, weights.tokenizer, Path(workdir) / STAGE2_FOLDER,
                           step=step, scheduler_config=dict(config.model.scheduler))
        if jax.process_index() == 0:
            print(f"wrote the trained CoSeR weights to {out} (jaxsr sr --weights {out})",
                  flush=True)

    make_evaluator = None
    if config.get("eval", {}).get("every", 0):
        from jaxsr.train.coser_samples import coser_evaluator

        make_evaluator = coser_evaluator(config, nets, weights.tokenizer)
    return Task(trainable=trainable, frozen=frozen, loss_fn=loss_fn, finish=finish,
                make_evaluator=make_evaluator,
                extra_inputs={"ids": ((77,), jnp.int32), "ref": ((s, s, 3), jnp.uint8)})




# ----------------------------------------------------------------- both


def coser_task(config, workdir, weights: StageWeights | None = None) -> tuple[Task, object]:
    """(the stage's Task, its tokenizer); weights: `load_weights`' (the default) or
    `weight_shapes`' (an abstract Task: `jaxsr plan`)."""
    from jaxsr.data.degrade import degrade_batch, preset_by_name

    stage = stage_of(config)
    if weights is None:
        weights = load_weights(config, stage)
    _check_widths(weights)
    preset = preset_by_name(config.degradation)
    degrade_fn = lambda keys, hr: degrade_batch(keys, hr, preset)
    task = (stage1_task(config, workdir, weights, degrade_fn) if stage == 1 else
            stage2_task(config, workdir, weights, degrade_fn, preset.usm_sharpen))
    return task, weights.tokenizer


def coser_iterator(config, tokenizer):
    """() -> this process's iterator of CoSeR batches from config.data.source, a
    manifest (jaxsr.data.tfds_manifest)."""
    from jaxsr.data.coser_input import make_coser_iterator, open_manifest_source
    from jaxsr.data.sources import default_data_dir

    if not config.data.source:
        raise ValueError("config.data.source is empty: give a CoSeR manifest (JSON lines; "
                         "see jaxsr/data/tfds_manifest.py)")

    def make():
        source = open_manifest_source(config.data.source,
                                      config.data.data_dir or default_data_dir())
        return make_coser_iterator(
            source, tokenizer, global_batch_size=int(config.data.global_batch_size),
            size=int(config.data.crop_size), seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            with_reference=stage_of(config) == 2, shuffle=config.data.shuffle,
            worker_count=config.data.worker_count)

    return make


def train(config, workdir, *, devices=None, make_iterator=None) -> TrainResult:
    """Run (or resume) CoSeR stage 1 or 2 (config.task) in `workdir`."""
    task, tokenizer = coser_task(config, workdir)
    return run(task, config, workdir, devices=devices,
               make_iterator=make_iterator or coser_iterator(config, tokenizer))
