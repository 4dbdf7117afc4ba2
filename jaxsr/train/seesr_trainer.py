"""Train SeeSR: one flat loop, big_vision style (sections below run top to bottom).

    status = train(config, workdir)          # configs/seesr_train.py; 0 when finished

mesh → networks and weights (frozen / trainable split) → optimizer and sharded state →
input (TFDS source → grain, per process) → resume or initialise → ahead-of-time
compile, memory analysis printed → loop (train step, metrics, checkpoints, SIGTERM,
NaN guard).

A run is resumable: the same workdir continues from its newest checkpoint, with the
data iterator where it was, so a restarted run computes the same steps as one that
was never interrupted. SIGTERM saves a checkpoint at the end of the current step and
exits with status 143. A non-finite loss stops the run before anything after the
last good checkpoint is saved (FloatingPointError).
"""

from __future__ import annotations

import dataclasses
import signal
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsr.convert.seesr_weights import load_seesr_folder
from jaxsr.diffusion.schedule import SchedulerConfig
from jaxsr.models.clip_text import CLIPTextModel
from jaxsr.models.controlnet import ControlNetModel, controlnet_params_from_unet
from jaxsr.models.dape import DAPE
from jaxsr.models.tokenizer import load_tokenizer
from jaxsr.models.unet import UNet2DConditionModel
from jaxsr.models.vae import AutoencoderKL
from jaxsr.parallel.mesh import batch_axes, make_mesh
from jaxsr.parallel.sharding import infer_shardings, shard_params
from jaxsr.train.checkpoint import Checkpoints
from jaxsr.train.metrics import MetricWriter
from jaxsr.train.prompt_tokens import TagTokenTable
from jaxsr.train.seesr_objective import SeeSRTrainNets, seesr_loss, split_unet
from jaxsr.train.shardings import state_shardings
from jaxsr.train.step import init_state, make_optimizer, train_step

EXIT_TERMINATED = 143
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_weights(config):
    """(SeeSRWeights, tokenizer) from `config.init.weights`: a converted folder, or
    "random" (tiny random weights through a temporary folder; the same in every
    process, since they are drawn from config.seed)."""
    source = config.init.weights
    if not source:
        raise ValueError("config.init.weights is empty: give a `jaxsr convert --seesr` "
                         "folder (or 'random' for the tiny variant)")
    if source != "random":
        weights = load_seesr_folder(source)
        if weights.tokenizer_dir is None:
            raise FileNotFoundError(f"{source} has no tokenizer/; reconvert with jaxsr convert")
        return weights, load_tokenizer(weights.tokenizer_dir)
    from jaxsr.demo import write_random_seesr

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_seesr(Path(tmp) / "weights", config.model, seed=config.seed,
                                    log=lambda *_: None)
        weights = load_seesr_folder(folder)
        # The tokenizer is read now, before the folder goes away.
        return weights, load_tokenizer(folder / "tokenizer")


def build_networks(config, weights, tokenizer) -> SeeSRTrainNets:
    dt = _DTYPES[config.model.dtype]
    att = config.model.attention
    return SeeSRTrainNets(
        unet=UNet2DConditionModel(weights.unet[0], dtype=dt, attention=att),
        controlnet=ControlNetModel(weights.controlnet[0], dtype=dt, attention=att),
        vae=AutoencoderKL(weights.vae[0], dtype=dt, attention=att),
        text_encoder=CLIPTextModel(weights.text_encoder[0], dtype=dt, attention=att),
        dape=DAPE(weights.dape[0], attention=att, dtype=dt),
        tag_table=TagTokenTable.build(tokenizer, weights.tags),
        thresholds=np.asarray(weights.thresholds, np.float32),
        alphas_cumprod=SchedulerConfig.from_diffusers(weights.scheduler_config, "ddpm")
        .alphas_cumprod())


def split_params(config, weights) -> tuple[dict, dict]:
    """(trainable, frozen) host trees: ControlNet + UNet RCA vs the rest."""
    frozen_unet, rca = split_unet(weights.unet[1])
    cn = weights.controlnet[1]
    if config.init.controlnet_from_unet:
        cn = jax.tree.map(np.asarray, controlnet_params_from_unet(
            weights.unet[1], cn, jax.random.key(config.seed)))
    trainable = {"controlnet": cn, "unet_rca": rca}
    frozen = {"unet": frozen_unet, "vae": weights.vae[1],
              "text_encoder": weights.text_encoder[1], "dape": weights.dape[1]}
    return trainable, frozen


def degradation_fn(config):
    """(keys [B], hr [B,S,S,3]) -> (lr, target) with config.degradation's preset."""
    from jaxsr.data.degrade import degrade_batch, preset_by_name

    preset = preset_by_name(config.degradation)
    return lambda keys, hr: degrade_batch(keys, hr, preset)


def global_batch(local: dict, sharding, accum: int):
    """Process-local uint8 [b, S, S, 3] → global [A, B/A, S, S, 3] on the mesh."""
    hr = np.asarray(local["hr"])
    b = hr.shape[0]
    local_ = hr.reshape((accum, b // accum) + hr.shape[1:])
    shape = (accum, b // accum * jax.process_count()) + hr.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local_, shape)


@dataclasses.dataclass
class TrainResult:
    status: int                 # 0: total_steps done; EXIT_TERMINATED: stopped by SIGTERM
    step: int
    state: object               # the final TrainState (sharded over `mesh`)
    mesh: object
    frozen: dict                # the frozen params, as placed on the mesh


def _barrier(name: str) -> None:
    """Wait on the host until every process gets here. Before the first collective
    program: processes that finish compiling (or loading it from the cache) at very
    different times would otherwise exceed gloo's 30 s connection deadline on CPU."""
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed

        jax_distributed.global_state.client.wait_at_barrier(f"jaxsr/{name}", 3_600_000)


class _Terminate:
    """Remembers a SIGTERM so the loop can save and stop at the end of a step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, step: int) -> bool:
        """True in every process when any process was asked to stop by this step.

        Multi-process runs must stop at the same step (a checkpoint save is
        collective). The processes agree through the coordination service's key-value
        store and a barrier, on the host: a device collective here would run beside
        the in-flight train step, and CPU collectives can then deadlock."""
        if jax.process_count() == 1:
            return self.requested
        from jax._src import distributed as jax_distributed

        client = jax_distributed.global_state.client
        if self.requested:
            client.key_value_set(f"jaxsr/stop/{jax.process_index()}", str(step),
                                 allow_overwrite=True)
        client.wait_at_barrier(f"jaxsr/step/{step}", 3_600_000)
        return bool(client.key_value_dir_get("jaxsr/stop/"))

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir, *, devices=None, make_iterator=None) -> TrainResult:
    """Run (or resume) training in `workdir` on `devices` (default: every device of
    every process). The result's status is 0 when total_steps are done, or
    EXIT_TERMINATED after a SIGTERM (a checkpoint of the last step is saved).
    make_iterator: () -> an iterator with get_state/set_state yielding
    {"hr": uint8 [b_local, S, S, 3]} (default: config.data through TFDS and grain)."""
    workdir = Path(workdir)
    log = MetricWriter(workdir, config.total_steps)

    # ------------------------------------------------------------------ mesh
    mesh = make_mesh([tuple(a) for a in config.mesh], devices)
    log.note(f"mesh {dict(mesh.shape)} over {mesh.size} devices, "
             f"{jax.process_count()} process(es)")
    rep = NamedSharding(mesh, P())

    # ------------------------------------------------------------------ networks
    weights, tokenizer = load_weights(config)
    nets = build_networks(config, weights, tokenizer)
    trainable, frozen = split_params(config, weights)
    del weights

    # ------------------------------------------------------------------ optimizer, state
    tx, schedule = make_optimizer(config.optim)
    state_shapes = jax.eval_shape(partial(init_state, tx=tx, ema_decay=config.ema_decay),
                                  trainable)
    state_sh = state_shardings(state_shapes, mesh, [tuple(r) for r in
                                                    config.sharding.trainable])
    frozen_sh = infer_shardings(frozen, mesh, [tuple(r) for r in config.sharding.frozen])
    frozen = shard_params(frozen, frozen_sh)

    # ------------------------------------------------------------------ input
    accum = int(config.grad_accum_steps)
    gbs = int(config.data.global_batch_size)
    if gbs % (accum * jax.process_count()) or (gbs // accum) % mesh.size:
        raise ValueError(f"global batch {gbs} must split into {accum} accumulation steps "
                         f"of a multiple of {mesh.size} devices over "
                         f"{jax.process_count()} processes")
    if make_iterator is None:
        from jaxsr.data.sources import open_source
        from jaxsr.data.train_input import make_train_iterator

        source = open_source(config.data.source, config.data.data_dir or None)
        make_iterator = partial(
            make_train_iterator, source, global_batch_size=gbs,
            crop_size=config.data.crop_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            shuffle=config.data.shuffle, worker_count=config.data.worker_count)
    data = make_iterator()
    batch_sh = NamedSharding(mesh, P(None, batch_axes(mesh)))

    # ------------------------------------------------------------------ resume or init
    ckpt = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            state_shapes, state_sh)
    _barrier("before_restore")
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        start, state, data_state = restored
        data.set_state(data_state)
        log.note(f"resumed from step {start} ({ckpt.directory})")
    else:
        start = 0
        init = jax.jit(partial(init_state, tx=tx, ema_decay=config.ema_decay),
                       out_shardings=state_sh)
        state = init(shard_params(trainable, state_sh.params))
    del trainable

    # ------------------------------------------------------------------ compile
    base_key = jax.random.key(config.seed)
    degrade_fn = degradation_fn(config)
    loss_fn = lambda p, fz, hr, keys: seesr_loss(
        nets, p, fz, hr.astype(jnp.float32) / 255.0, keys, degrade_fn,
        float(config.null_text_ratio))
    step_fn = jax.jit(partial(train_step, loss_fn, tx, schedule, float(config.ema_decay)),
                      in_shardings=(state_sh, frozen_sh, batch_sh, rep),
                      out_shardings=(state_sh, rep), donate_argnums=(0,))
    s = config.data.crop_size
    batch_shape = jax.ShapeDtypeStruct((accum, gbs // accum, s, s, 3), jnp.uint8,
                                       sharding=batch_sh)
    t0 = time.perf_counter()
    compiled = step_fn.lower(abstract, frozen, batch_shape, base_key).compile()
    step_flops = _flops(compiled)
    log.note(f"compiled the train step in {time.perf_counter() - t0:.1f} s; "
             + memory_summary(compiled))

    # ------------------------------------------------------------------ loop
    _barrier("compiled")
    terminate = _Terminate()
    pending: list[tuple[int, dict]] = []
    last_log = (start, time.perf_counter())
    step = start
    try:
        while step < config.total_steps:
            batch = global_batch(next(data), batch_sh, accum)
            state, metrics = compiled(state, frozen, batch, base_key)
            step += 1
            pending.append((step, metrics))
            stop = terminate.agreed(step)
            save = step % config.checkpoint_every == 0 or step == config.total_steps or stop
            if save or step % config.log_every == 0:
                _check_finite(pending)
                m = {k: float(v) for k, v in pending[-1][1].items()}
                now = time.perf_counter()
                dt = (now - last_log[1]) / (step - last_log[0])
                m["images_per_s"] = gbs / dt
                if step_flops:
                    m["tflops_per_device"] = step_flops / dt / 1e12
                log.write(step, m)
                pending.clear()
                last_log = (step, now)
            if save:
                ckpt.save(step, state, data.get_state(), config.to_dict())
            if stop:
                ckpt.wait()
                log.note(f"SIGTERM: saved step {step}, exiting")
                return TrainResult(EXIT_TERMINATED, step, state, mesh, frozen)
        return TrainResult(0, step, state, mesh, frozen)
    finally:
        terminate.restore()
        ckpt.close()
        log.close()


def _check_finite(pending) -> None:
    for step, m in pending:
        loss = float(m["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {step}; stopped without saving, so the newest "
                "checkpoint is the last good one (lower the learning rate, or check the "
                "data)")


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - cost analysis is optional per backend
        return None


def memory_summary(compiled) -> str:
    """Per-device bytes of the compiled step: arguments (params, optimizer state, batch),
    outputs, temporaries (activations, gradients)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return "memory analysis unavailable"
    gib = 2.0 ** 30
    return (f"per device: arguments {m.argument_size_in_bytes / gib:.3f} GiB, outputs "
            f"{m.output_size_in_bytes / gib:.3f} GiB, temporaries "
            f"{m.temp_size_in_bytes / gib:.3f} GiB, aliased "
            f"{m.alias_size_in_bytes / gib:.3f} GiB")
