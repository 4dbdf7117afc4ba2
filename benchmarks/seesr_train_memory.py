"""Per-device memory of full-size SeeSR training under FSDP, from the compiled step.

    python benchmarks/seesr_train_memory.py                 # fsdp 1, 2, 4, 8 on 8 CPU devices

For each FSDP degree N (mesh data = 8/N × fsdp = N over 8 forced host devices),
with abstract full-size params (nothing is allocated):

- default: the optimizer half of the train step — gradients in, clip + AdamW update
  of the TrainState out, with the trainer's shardings and donation — is compiled,
  and XLA's memory analysis of it gives per-device bytes of params + optimizer state
  + gradients (its arguments) and of its temporaries. Compiles in seconds.
- `--full-step`: the whole train step (degradation, frozen DAPE/text/VAE, ControlNet
  + UNet forward and backward, update) at batch 8 of 64² crops, frozen weights
  FSDP-sharded too; its arguments add the frozen weights and the batch, its
  temporaries the activations. Several minutes per N on a CPU.

The trainable set is ControlNet + the UNet's 16 RCA blocks (its size is printed);
params + AdamW state per device are also summed exactly from the shardings.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, print_table, write_json  # noqa: E402

GIB = 2.0 ** 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fsdp", default="1,2,4,8")
    ap.add_argument("--variant", default="base", choices=["base", "tiny"])
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--full-step", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs import seesr_train
    from jaxsr.parallel.mesh import batch_axes, make_mesh
    from jaxsr.parallel.sharding import infer_shardings
    from jaxsr.train.seesr_objective import seesr_loss
    from jaxsr.train.seesr_trainer import (
        build_networks,
        degradation_fn,
        seesr_weight_shapes,
        split_params,
    )
    from jaxsr.train.shardings import state_shardings
    from jaxsr.train.step import init_state, make_optimizer, train_step

    config = seesr_train.get_config(args.variant)
    config.data.crop_size = args.crop
    config.model.dtype = "bfloat16"
    config.frozen_dtype = "float32"     # as measured before frozen weights went bf16
    weights, tokenizer = seesr_weight_shapes(config)
    nets = build_networks(config, weights, tokenizer)
    trainable, frozen = split_params(config, weights)     # float32 shapes
    count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))
    n_train, n_frozen = count(trainable), count(frozen)
    print(f"trainable {n_train:,} params, frozen {n_frozen:,}", flush=True)

    tx, schedule = make_optimizer(config.optim)
    degrade = degradation_fn(config)
    loss_fn = lambda p, fz, hr, keys: (seesr_loss(nets, p, fz, hr.astype(jnp.float32) / 255,
                                                  keys, degrade, 0.5), {})
    def attach(tree, shardings):
        return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            tree, shardings)

    rows = []
    for n in [int(x) for x in args.fsdp.split(",")]:
        mesh = make_mesh([("data", -1), ("fsdp", n)])
        rule = [(".*", "fsdp(axis=fsdp, min_size_mb=0.5)")]
        shapes = jax.eval_shape(lambda p: init_state(p, tx, 0.0), trainable)
        st_sh = state_shardings(shapes, mesh, rule)
        fz_sh = infer_shardings(frozen, mesh, rule)
        rep = NamedSharding(mesh, P())
        batch_sh = NamedSharding(mesh, P(None, batch_axes(mesh)))
        t0 = time.perf_counter()
        if args.full_step:
            step = jax.jit(
                lambda s, fz, b, k: train_step(loss_fn, tx, schedule, 0.0, s, fz, b, k),
                in_shardings=(st_sh, fz_sh, batch_sh, rep), out_shardings=(st_sh, rep),
                donate_argnums=(0,))
            batch = jax.ShapeDtypeStruct((1, 8, args.crop, args.crop, 3), jnp.uint8,
                                         sharding=batch_sh)
            compiled = step.lower(attach(shapes, st_sh), attach(frozen, fz_sh), batch,
                                  jax.random.key(0)).compile()
        else:
            def update(state, grads):
                updates, opt_state = tx.update(grads, state.opt_state, state.params)
                return state.replace(step=state.step + 1, opt_state=opt_state,
                                     params=optax.apply_updates(state.params, updates))

            compiled = jax.jit(update, in_shardings=(st_sh, st_sh.params),
                               out_shardings=st_sh, donate_argnums=(0,)).lower(
                attach(shapes, st_sh), attach(shapes.params, st_sh.params)).compile()
        m = compiled.memory_analysis()
        exact = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                    for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(st_sh)))
        row = {"fsdp": n, "data": 8 // n, "program": "full step" if args.full_step
               else "update", "compile_s": time.perf_counter() - t0,
               "trainable_state_GiB": exact / GIB,
               "arguments_GiB": m.argument_size_in_bytes / GIB,
               "temporaries_GiB": m.temp_size_in_bytes / GIB,
               "outputs_GiB": m.output_size_in_bytes / GIB,
               "aliased_GiB": m.alias_size_in_bytes / GIB}
        rows.append(row)
        print_table([row], list(row))
    cols = list(rows[0])
    print(f"\nSeeSR {args.variant} training, per device (8 CPU devices), trainable "
          f"{n_train:,} / frozen {n_frozen:,} params"
          + (f", full step at batch 8 of {args.crop}²" if args.full_step else
             ", compiled update (params + Adam state + gradients in)"))
    print_table(rows, cols)
    suffix = "_full_step" if args.full_step else ""
    write_json(args.out or f"benchmarks/results/seesr_train_memory_{args.variant}{suffix}.json",
               {"benchmark": "seesr_train_memory", "variant": args.variant,
                "trainable_params": n_train, "frozen_params": n_frozen, "rows": rows,
                "environment": environment()})


if __name__ == "__main__":
    main()
