"""`jaxsr plan --program train` for the DAPE and CoSeR trainers (jaxsr/plan/trainers.py)
and SeeSR's (jaxsr/plan/programs.py; its TPU compile is in tests/test_plan.py).

Default suite: each tiny trainer's train step, built from shapes alone, traces for a
v5e:2x2 mesh of data 2 x fsdp 2 (shapes and shardings line up; no compile), and its
abstract trainable / frozen trees are the ones the trainer builds from weights.
Slow: each one compiled by the TPU compiler through `build_plan`, with every trainable
tensor split over fsdp (the tiny tensors are below the configs' 0.5 MB threshold).
"""

import argparse
import json
import time

import jax
import pytest

from configs import coser_train, dape_train, seesr_train
from jaxsr.plan.topology import libtpu_status

_REASON = libtpu_status()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"no TPU compiler: {_REASON}")

AXES = [("data", 2), ("fsdp", 2)]
TRAINERS = {"dape": ("configs/dape_train.py:tiny", lambda: dape_train.get_config("tiny")),
            "coser_stage1": ("configs/coser_train.py:stage1_tiny",
                             lambda: coser_train.get_config("stage1_tiny")),
            "coser_stage2": ("configs/coser_train.py:stage2_tiny",
                             lambda: coser_train.get_config("stage2_tiny"))}
# The default tests' set: SeeSR's step is compiled for a TPU in tests/test_plan.py.
WITH_SEESR = {**TRAINERS, "seesr": ("configs/seesr_train.py:tiny",
                                    lambda: seesr_train.get_config("tiny"))}
REPORT_KEYS = {"topology", "chip", "chips", "mesh", "program", "batch_per_chip", "memory",
               "hbm_bytes", "fits", "flops_per_chip", "hbm_traffic_bytes", "collectives",
               "predicted", "warnings"}
MEMORY_KEYS = {"params", "optimizer", "frozen", "batch", "temporaries", "generated_code",
               "total"}


def _program(name, batch_per_chip):
    from jaxsr.parallel.mesh import make_mesh
    from jaxsr.plan.programs import seesr_train_program
    from jaxsr.plan.topology import tpu_topology
    from jaxsr.plan.trainers import coser_train_program, dape_train_program
    from jaxsr.platform import compiling_for

    config = WITH_SEESR[name][1]()
    devices, _ = tpu_topology("v5e:2x2")
    mesh = make_mesh(AXES, devices)
    build = {"dape": dape_train_program,
             "seesr": seesr_train_program}.get(name, coser_train_program)
    with compiling_for("tpu"):
        program = build(config, mesh, batch_per_chip)
        program.jitted.trace(*program.args)
    return program


@pytest.mark.parametrize("name", sorted(WITH_SEESR))
def test_tiny_train_step_traces_from_shapes(name):
    program = _program(name, batch_per_chip=2)
    # data 2 x fsdp 2: both axes split the batch, 4 chips x 2 examples.
    assert program.images_per_call == 4 * 2
    parts = program.argument_parts
    assert parts["params"] > 0 and parts["frozen"] > 0 and parts["batch"] > 0
    # AdamW's two moments (no EMA in these configs) and its step counters.
    assert parts["optimizer"] >= 2 * parts["params"]
    state, frozen, batch, _ = program.args
    assert set(batch) == {"dape": {"hr"}, "seesr": {"hr"}, "coser_stage1": {"hr", "ids"},
                          "coser_stage2": {"hr", "ids", "ref"}}[name]
    for leaf in batch.values():
        assert leaf.shape[:2] == (1, 8)


def _structure(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


@pytest.mark.parametrize("name", sorted(WITH_SEESR))
def test_abstract_split_is_the_trainers_split(name, tmp_path):
    """The trees `jaxsr plan` builds from shapes are those the trainer builds from its
    (tiny, random) weights: same leaves, shapes and dtypes."""
    from jaxsr.train import coser_trainer, dape_trainer, seesr_trainer

    config = WITH_SEESR[name][1]()
    if name == "seesr":
        real = seesr_trainer.seesr_task(config, tmp_path)
        shapes = seesr_trainer.seesr_task(config, tmp_path,
                                          weights=seesr_trainer.seesr_weight_shapes(config))
    elif name == "dape":
        real = dape_trainer.dape_task(config, tmp_path)
        shapes = dape_trainer.dape_task(config, tmp_path,
                                        weights=dape_trainer.dape_weight_shapes(config))
    else:
        stage = coser_trainer.stage_of(config)
        real, _ = coser_trainer.coser_task(config, tmp_path)
        shapes, _ = coser_trainer.coser_task(
            config, tmp_path, weights=coser_trainer.weight_shapes(config, stage))
    assert _structure(shapes.trainable) == _structure(real.trainable)
    assert _structure(shapes.frozen) == _structure(real.frozen)
    assert shapes.extra_inputs == real.extra_inputs


def test_unknown_task_names_the_known_ones():
    from jaxsr.commands.plan import build_plan

    config = dape_train.get_config("tiny")
    config.task = "esrgan"
    args = _plan_args("configs/dape_train.py:tiny")
    with pytest.raises(ValueError, match="'coser_stage2'.*'esrgan'"):
        build_plan(args, config=config)


def _plan_args(config, **kw):
    base = dict(program="train", config=config, topology="v5e:2x2", num_slices=1,
                mesh=repr(AXES), batch_per_chip=1, size=None, steps=None, repeats=1,
                json=None, config_overrides=[])
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_tiny_train_step_compiles_for_v5e_2x2(name):
    from jaxsr.commands.plan import build_plan

    path, make = TRAINERS[name]
    config = make()
    config.sharding.trainable = [(".*", "fsdp(axis=fsdp, min_size_mb=0)")]
    t0 = time.perf_counter()
    report = build_plan(_plan_args(path, batch_per_chip=2), config=config)
    seconds = time.perf_counter() - t0
    json.dumps(report)
    assert REPORT_KEYS <= set(report) and MEMORY_KEYS <= set(report["memory"])
    assert report["chips"] == 4 and report["mesh"] == dict(AXES) and report["fits"]
    mem, coll = report["memory"], report["collectives"]
    assert mem["optimizer"] == pytest.approx(2 * mem["params"], rel=0.01)
    assert mem["frozen"] > 0 and mem["temporaries"] > 0
    assert report["flops_per_chip"] > 0
    assert coll["all-gather"]["count"] > 0 and coll["reduce-scatter"]["count"] > 0
    print(f"\n{name}: {seconds:.0f} s; program {report['program']!r}; memory total "
          f"{mem['total']} B (params {mem['params']}, optimizer {mem['optimizer']}, frozen "
          f"{mem['frozen']}, batch {mem['batch']}, temporaries {mem['temporaries']}); "
          f"flops_per_chip {report['flops_per_chip']:.4g}; collectives "
          + ", ".join(f"{k} {v['count']}" for k, v in coll.items())
          + f"; predicted {report['predicted']}; warnings {len(report['warnings'])}")
