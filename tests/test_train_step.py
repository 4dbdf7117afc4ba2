"""The generic train step on a small least-squares model: accumulation, clipping,
EMA and example keys against direct computations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxsr.train.step import example_keys, init_state, make_optimizer, train_step

OPTIM = ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_steps=0, b1=0.9, b2=0.999,
                                       eps=1e-8, weight_decay=1e-2, grad_clip_norm=1.0))


def loss_fn(params, frozen, batch, keys):
    """Mean squared error of a linear model, plus a key-dependent term so the keys
    the step hands out matter; aux: the mean prediction (reported, not trained)."""
    noise = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
    pred = batch["x"] @ params["w"] + params["b"] + frozen["shift"]
    return jnp.mean((pred[:, 0] - batch["y"] - 0.1 * noise) ** 2), {"mean_pred": pred.mean()}


def _data(n=8):
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 3)).astype(np.float32),
            "y": rng.normal(size=(n,)).astype(np.float32)}


def test_accumulation_equals_one_big_batch_and_matches_optax():
    tx, schedule = make_optimizer(OPTIM)
    params = {"w": jnp.ones((3, 1)), "b": jnp.zeros((1,))}
    frozen = {"shift": jnp.float32(0.5)}
    data, key = _data(), jax.random.key(3)
    state = init_state(params, tx, 0.0)
    results = {}
    for accum in (1, 2, 4):
        batch = jax.tree.map(lambda a, m=accum: a.reshape((m, -1) + a.shape[1:]), data)
        results[accum] = jax.jit(lambda s, b: train_step(loss_fn, tx, schedule, 0.0, s,
                                                         frozen, b, key))(state, batch)
    for accum in (2, 4):
        for a, b in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[accum])):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)

    # The same update by hand: the full batch's gradient with example i's key
    # fold_in(fold_in(key, step), i), clipped to norm 1, through optax's AdamW.
    keys = example_keys(key, 0, 1, 8)[0]
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, data, keys)
    norm = optax.tree.norm(grads)
    clipped = jax.tree.map(lambda g: g * jnp.minimum(1.0, 1.0 / norm), grads)
    adamw = optax.adamw(0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)
    updates, _ = adamw.update(clipped, adamw.init(params), params)
    want = optax.apply_updates(params, updates)
    new_state, metrics = results[1]
    assert int(new_state.step) == 1
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
    # aux parts are averaged over the micro-batches like the loss
    for accum in (1, 2, 4):
        np.testing.assert_allclose(float(results[accum][1]["mean_pred"]),
                                   float(aux["mean_pred"]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(norm), rtol=1e-6)
    assert float(norm) > 1.0                        # so clipping really acted
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(new_state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_ema_follows_the_params():
    tx, schedule = make_optimizer(OPTIM)
    params = {"w": jnp.ones((3, 1)), "b": jnp.zeros((1,))}
    state = init_state(params, tx, 0.9)
    batch = jax.tree.map(lambda a: a[None], _data())
    step = jax.jit(lambda s: train_step(loss_fn, tx, schedule, 0.9, s, {"shift": 0.0},
                                        batch, jax.random.key(0)))
    ema = params
    for _ in range(3):
        state, _ = step(state)
        ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, state.params)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(state.ema)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)


def test_schedule_warmup_and_milestones():
    """Linear warm-up from 0, then the rate times gamma at each milestone passed
    (basicsr's MultiStepLR with warm-up, as the DAPE recipe uses)."""
    optim = ml_collections.ConfigDict(dict(OPTIM.to_dict(), learning_rate=1e-4,
                                           warmup_steps=50, milestones=[200, 300], gamma=0.5))
    _, schedule = make_optimizer(optim)
    got = [float(schedule(s)) for s in (0, 25, 50, 199, 200, 299, 300, 10_000)]
    want = [0.0, 5e-5, 1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 2.5e-5]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    _, constant = make_optimizer(OPTIM)
    assert float(constant(0)) == float(constant(10**6)) == np.float32(0.1)
