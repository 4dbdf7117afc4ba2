"""The training loop every jaxsr trainer runs: one flat function, big_vision style.

    result = run(task, config, workdir)      # task: what to train (seesr_trainer, dape_trainer)

mesh → sharded frozen params and train state → input (TFDS source → grain, per
process) → resume or initialise → ahead-of-time compile, memory analysis printed →
loop (train step, metrics, sample images, checkpoints, SIGTERM, NaN guard).

A run is resumable: the same workdir continues from its newest checkpoint, with the
data iterator where it was, so a restarted run computes the same steps as one that
was never interrupted. SIGTERM saves a checkpoint at the end of the current step and
exits with status 143. A non-finite loss or parameter stops the run before anything
after the last good checkpoint is saved (FloatingPointError).

Config fields read here: seed, mesh, sharding.{trainable,frozen}, frozen_dtype, optim, ema_decay,
grad_accum_steps, data.{source,data_dir,crop_size,global_batch_size,shuffle,
worker_count,augment}, total_steps, log_every, checkpoint_every, keep_checkpoints,
samples.every, eval.every.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsr.parallel.mesh import batch_axes, make_mesh
from jaxsr.parallel.sharding import infer_shardings, shard_params
from jaxsr.train.checkpoint import Checkpoints
from jaxsr.train.metrics import MetricWriter
from jaxsr.train.shardings import state_shardings
from jaxsr.train.step import init_state, make_optimizer, train_step

EXIT_TERMINATED = 143


@dataclasses.dataclass
class Task:
    """What the loop trains.

    trainable, frozen: host trees of float32 numpy arrays (the frozen ones are never
      updated and not checkpointed).
    loss_fn(trainable, frozen, hr, keys) -> (loss, aux): hr float32 [m, S, S, 3] in
      [0, 1], the clean crops of one micro-batch; keys [m] typed, one per example; aux
      a dict of float32 scalars logged beside the loss.
    extra_inputs: {name: (shape, dtype)} of per-example fields the iterator's batches
      carry beside "hr" (token ids, a reference image, ...); they reach loss_fn as
      keyword arguments, [m, *shape] per micro-batch, exactly as the iterator gave them.
      Empty (the default): loss_fn(trainable, frozen, hr, keys) as above.
    make_sampler(mesh, frozen_shardings) -> sample(step, trainable, frozen): optional;
      writes sample images; called by every process (it runs on the mesh).
    finish(state, step): optional; runs in every process after the last step (export).
    make_evaluator(mesh, frozen_shardings) -> evaluate(step, trainable, frozen): optional;
      scores held-out images, {metric: float}, every config.eval.every steps; logged as
      "eval/<metric>" rows of metrics.jsonl and TensorBoard. Called by every process.
    """

    trainable: dict
    frozen: dict
    loss_fn: Callable
    make_sampler: Callable | None = None
    finish: Callable | None = None
    make_evaluator: Callable | None = None
    extra_inputs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainResult:
    status: int                 # 0: total_steps done; EXIT_TERMINATED: stopped by SIGTERM
    step: int
    state: object               # the final TrainState (sharded over `mesh`)
    mesh: object
    frozen: dict                # the frozen params, as placed on the mesh


def global_batch(local: dict, sharding, accum: int, names=("hr",)) -> dict:
    """Process-local fields [b, ...] (hr: uint8 [b, S, S, 3]) → {name: global
    [A, B/A, ...]} on the mesh, for each of `names`."""
    def one(x):
        x = np.asarray(x)
        b = x.shape[0]
        local_ = x.reshape((accum, b // accum) + x.shape[1:])
        shape = (accum, b // accum * jax.process_count()) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, local_, shape)

    return {name: one(local[name]) for name in names}


def frozen_in_bfloat16(tree):
    """Floating leaves of a host tree in bfloat16 (config.frozen_dtype): networks that
    compute in bfloat16 cast their kernels at use anyway, so holding the frozen ones
    in bfloat16 halves their memory."""
    import ml_dtypes

    def one(x):
        x = np.asarray(x)
        return x.astype(ml_dtypes.bfloat16) if np.issubdtype(x.dtype, np.floating) else x

    return jax.tree.map(one, tree)


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


def default_iterator(config):
    """() -> this process's grain iterator over config.data (TFDS source → grain)."""
    from jaxsr.data.sources import open_source
    from jaxsr.data.train_input import make_train_iterator

    source = open_source(config.data.source, config.data.data_dir or None)
    return partial(
        make_train_iterator, source, global_batch_size=int(config.data.global_batch_size),
        crop_size=config.data.crop_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        shuffle=config.data.shuffle, worker_count=config.data.worker_count,
        augment=config.data.get("augment", "crop_flip"))


def state_layout(trainable, config, mesh):
    """(tx, schedule, abstract TrainState, its shardings) for a trainable tree (arrays or
    ShapeDtypeStructs): config.optim, config.ema_decay, config.sharding.trainable."""
    tx, schedule = make_optimizer(config.optim)
    state_shapes = jax.eval_shape(partial(init_state, tx=tx, ema_decay=config.ema_decay),
                                  trainable)
    state_sh = state_shardings(state_shapes, mesh, [tuple(r) for r in
                                                    config.sharding.trainable])
    return tx, schedule, state_shapes, state_sh


def jit_train_step(task: Task, config, tx, schedule, state_sh, frozen_sh, batch_sh):
    """The train step the loop compiles: step(state, frozen, batch, base_key) -> (state,
    metrics), batch {"hr": uint8, **task.extra_inputs} [A, m, ...], state donated."""
    rep = NamedSharding(batch_sh.mesh, P())
    extra = dict(task.extra_inputs)

    def loss_fn(p, fz, batch, keys):
        hr = batch["hr"].astype(jnp.float32) / 255.0
        return task.loss_fn(p, fz, hr, keys, **{k: batch[k] for k in extra})

    return jax.jit(partial(train_step, loss_fn, tx, schedule, float(config.ema_decay)),
                   in_shardings=(state_sh, frozen_sh, batch_sh, rep),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))


def batch_shapes(task: Task, config, batch_sh, accum: int, micro: int) -> dict:
    """{"hr": uint8 [A, m, S, S, 3], **task.extra_inputs} as ShapeDtypeStructs on
    `batch_sh` (S: config.data.crop_size)."""
    s = config.data.crop_size
    per_example = {"hr": ((s, s, 3), jnp.uint8), **task.extra_inputs}
    return {k: jax.ShapeDtypeStruct((accum, micro, *shape), dtype, sharding=batch_sh)
            for k, (shape, dtype) in per_example.items()}


def run(task: Task, config, workdir, *, devices=None, make_iterator=None) -> TrainResult:
    """Run (or resume) `task` in `workdir` on `devices` (default: every device of every
    process). The result's status is 0 when total_steps are done, or EXIT_TERMINATED
    after a SIGTERM (a checkpoint of the last step is saved).
    make_iterator: () -> an iterator with get_state/set_state yielding
    {"hr": uint8 [b_local, S, S, 3]} and the task's extra_inputs (default: config.data
    through TFDS and grain)."""
    workdir = Path(workdir)
    log = MetricWriter(workdir, config.total_steps)

    # ------------------------------------------------------------------ mesh
    mesh = make_mesh([tuple(a) for a in config.mesh], devices)
    log.note(f"mesh {dict(mesh.shape)} over {mesh.size} devices, "
             f"{jax.process_count()} process(es)")

    # ------------------------------------------------------------------ optimizer, state
    tx, schedule, state_shapes, state_sh = state_layout(task.trainable, config, mesh)
    if config.get("frozen_dtype", "float32") == "bfloat16":
        task.frozen = frozen_in_bfloat16(task.frozen)
    frozen_sh = infer_shardings(task.frozen, mesh, [tuple(r) for r in config.sharding.frozen])
    frozen = shard_params(task.frozen, frozen_sh)
    task.frozen = None          # the host copy is no longer needed

    # ------------------------------------------------------------------ input
    accum = int(config.grad_accum_steps)
    gbs = int(config.data.global_batch_size)
    if gbs % (accum * jax.process_count()) or (gbs // accum) % mesh.size:
        raise ValueError(f"global batch {gbs} must split into {accum} accumulation steps "
                         f"of a multiple of {mesh.size} devices over "
                         f"{jax.process_count()} processes")
    data = (make_iterator or default_iterator(config))()
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
        state = init(shard_params(task.trainable, state_sh.params))
    task.trainable = None

    # ------------------------------------------------------------------ compile
    base_key = jax.random.key(config.seed)
    step_fn = jit_train_step(task, config, tx, schedule, state_sh, frozen_sh, batch_sh)
    batch_shape = batch_shapes(task, config, batch_sh, accum, gbs // accum)
    t0 = time.perf_counter()
    compiled = step_fn.lower(abstract, frozen, batch_shape, base_key).compile()
    step_flops = _flops(compiled)
    log.note(f"compiled the train step in {time.perf_counter() - t0:.1f} s; "
             + memory_summary(compiled))
    sample_every = int(config.get("samples", {}).get("every", 0) or 0)
    sample = (task.make_sampler(mesh, frozen_sh)
              if sample_every and task.make_sampler is not None else None)
    eval_every = int(config.get("eval", {}).get("every", 0) or 0)
    evaluate = (task.make_evaluator(mesh, frozen_sh)
                if eval_every and task.make_evaluator is not None else None)

    # ------------------------------------------------------------------ loop
    _barrier("compiled")
    terminate = _Terminate()
    pending: list[tuple[int, dict]] = []
    last_log = (start, time.perf_counter())
    step = start
    try:
        while step < config.total_steps:
            batch = global_batch(next(data), batch_sh, accum, tuple(batch_shape))
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
            if sample is not None and step % sample_every == 0:
                t0 = time.perf_counter()
                for name, image in sample(step, state.params, frozen).items():
                    log.image(step, name, image)
                log.note(f"step {step}: sample images in {time.perf_counter() - t0:.1f} s")
                last_log = (step, time.perf_counter())   # keep images/s about training
            if evaluate is not None and step % eval_every == 0:
                t0 = time.perf_counter()
                scores = evaluate(step, state.params, frozen)
                log.write(step, {f"eval/{k}": v for k, v in scores.items()})
                shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                log.note(f"step {step}: held-out {shown} in {time.perf_counter() - t0:.1f} s")
                last_log = (step, time.perf_counter())
            if save:
                ckpt.save(step, state, data.get_state(), config.to_dict())
            if stop:
                ckpt.wait()
                log.note(f"SIGTERM: saved step {step}, exiting")
                return TrainResult(EXIT_TERMINATED, step, state, mesh, frozen)
        if task.finish is not None:
            ckpt.wait()
            task.finish(state, step)
        return TrainResult(0, step, state, mesh, frozen)
    finally:
        terminate.restore()
        ckpt.close()
        log.close()


def _check_finite(pending) -> None:
    """Raise at the first step whose loss or updated parameters are not finite."""
    for step, m in pending:
        loss, bad = float(m["loss"]), int(m.get("nonfinite_params", 0))
        if not np.isfinite(loss) or bad:
            what = (f"the loss is {loss}" if not np.isfinite(loss)
                    else f"{bad} parameter values are not finite")
            raise FloatingPointError(
                f"{what} at step {step}; stopped without saving, so the newest "
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
