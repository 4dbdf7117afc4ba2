"""The generic sharded train step: optimizer, gradient accumulation, EMA, metrics.

    state = TrainState(step, params, opt_state, ema)     # params: the trainable tree
    new_state, metrics = train_step(loss_fn, tx, schedule, ema_decay, state, frozen,
                                    batch, base_key)

`loss_fn(params, frozen, micro_batch, keys) -> (loss, aux)`: loss is a float32 scalar,
the mean over the micro-batch's examples; aux a dict of float32 scalars (loss parts)
that are averaged over the accumulation steps and reported beside the loss.
batch leaves are [A, m, ...]: A accumulation micro-batches of m examples, split over
the mesh's batch axes along m. Micro-batch gradients are averaged in a lax.scan, so
A = 1 and A = 4 give the same update for the same examples (up to float32 summation
order). Example i of step s draws from fold_in(fold_in(base_key, s), i), whatever the
accumulation and the mesh.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 []
    params: Any              # the trainable parameters, float32 master copies
    opt_state: Any
    ema: Any                 # EMA of params, or None


def learning_rate_schedule(optim) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then `learning_rate`, multiplied by
    `gamma` at each of `milestones` (absolute steps; basicsr's MultiStepLR). Without
    milestones the rate is constant after the warm-up (the SeeSR recipe)."""
    lr = float(optim.learning_rate)
    warm = int(optim.warmup_steps)
    milestones = [int(m) for m in (optim.get("milestones") or ())]
    gamma = float(optim.get("gamma", 1.0))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        rate = jnp.float32(lr)
        if warm:
            rate = rate * jnp.minimum(step / warm, 1.0)
        for m in milestones:
            rate = jnp.where(step >= m, rate * gamma, rate)
        return rate

    return schedule


def make_optimizer(optim) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on `learning_rate_schedule(optim)`, after global-norm clipping.

    optim: learning_rate, warmup_steps, b1, b2, eps, weight_decay, grad_clip_norm,
    optionally milestones and gamma."""
    schedule = learning_rate_schedule(optim)
    parts = []
    if optim.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip_norm)))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay))
    return optax.chain(*parts), schedule


def init_state(params, tx, ema_decay: float) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema_decay else None)


def example_keys(base_key, step, accum: int, micro: int):
    """[A, m] typed keys: example i of the step's global batch gets fold_in(k_step, i)."""
    k = jax.random.fold_in(base_key, step)
    return jax.vmap(lambda i: jax.random.fold_in(k, i))(
        jnp.arange(accum * micro)).reshape(accum, micro)


def train_step(loss_fn, tx, schedule, ema_decay: float, state: TrainState, frozen, batch,
               base_key):
    leaves = jax.tree.leaves(batch)
    accum, micro = leaves[0].shape[:2]
    keys = example_keys(base_key, state.step, accum, micro)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(g_sum, xs):
        mb, k = xs
        (loss, aux), g = grad_fn(state.params, frozen, mb, k)
        return jax.tree.map(jnp.add, g_sum, g), {"loss": loss, **aux}

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    g_sum, parts = jax.lax.scan(one, zeros, (batch, keys))
    grads = jax.tree.map(lambda g: g / accum, g_sum)
    parts = {k: jnp.mean(v.astype(jnp.float32)) for k, v in parts.items()}

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    # Counted every step (one cheap reduction) so a diverged update is caught before
    # the state holding it is checkpointed, not a step later when the loss shows it.
    nonfinite = sum(jnp.sum(~jnp.isfinite(p)) for p in jax.tree.leaves(params))
    metrics = {**parts, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step), "nonfinite_params": nonfinite}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics
