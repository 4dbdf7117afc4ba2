"""`jaxsr plan`: real TPU compiles for compile-only devices (libtpu, the tpu extra).

The tiny SeeSR train step and sampling program compile for v5e:2x2; the report's
keys, memory split, collectives and warnings are checked against what the meshes
must give. Parameter bytes per chip under FSDP and the tensor axis are checked on the
full-size shapes (exact, from the shardings, no compile).
"""

import argparse
import json
import math
import os

import jax
import pytest

from configs import seesr_train, sharding_rules
from jaxsr.plan.topology import libtpu_status

_REASON = libtpu_status()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"no TPU compiler: {_REASON}")

REPORT_KEYS = {"topology", "chip", "chips", "mesh", "program", "batch_per_chip", "memory",
               "hbm_bytes", "fits", "flops_per_chip", "hbm_traffic_bytes", "collectives",
               "predicted", "warnings"}
MEMORY_KEYS = {"params", "optimizer", "frozen", "batch", "temporaries", "generated_code",
               "total"}
KINDS = {"all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute"}


def plan_args(**kw):
    base = dict(program="train", config="configs/seesr_train.py:tiny", topology="v5e:2x2",
                num_slices=1, mesh=None, batch_per_chip=1, size=None, steps=None,
                repeats=1, json=None, config_overrides=[])
    return argparse.Namespace(**{**base, **kw})


def test_chip_table_matches_the_compile_only_devices():
    from jaxsr.plan.chips import CHIPS
    from jaxsr.plan.topology import tpu_topology

    for name, topology in [("v4", "v4:2x2x1"), ("v5e", "v5e:1x1"), ("v5p", "v5p:2x2x1"),
                           ("v6e", "v6e:1x1")]:
        devices, chip = tpu_topology(topology)
        chips = math.prod(int(x) for x in topology.split(":")[1].split("x"))
        cores = len(devices) // chips       # v4: one device per TensorCore
        assert devices[0].device_kind == chip.device_kind == CHIPS[name].device_kind
        assert cores in (1, 2) and len(devices) == chips * cores
        assert chip.peak_bf16_flops == CHIPS[name].peak_bf16_flops / cores
        assert chip.source.startswith("https://cloud.google.com/tpu/docs/")
        assert chip.peak_bf16_flops > 1e14 and chip.hbm_bytes > 1e10
        assert chip.ici_bytes_per_s > chip.dcn_bytes_per_s > 0


def test_mesh_axes_that_split_a_physical_axis():
    """FSDP 8 on v5p:4x4x4 (64 chips as a 4x4x4 torus): 8 is no product of the
    physical axes, so the axis splits one of them; every chip is used once."""
    from jaxsr.parallel.mesh import make_mesh
    from jaxsr.plan.topology import tpu_topology

    devices, _ = tpu_topology("v5p:4x4x4")
    for axes, shape in [([("data", -1), ("fsdp", 8)], {"data": 8, "fsdp": 8}),
                        ([("data", -1), ("fsdp", 16)], {"data": 4, "fsdp": 16})]:
        mesh = make_mesh(axes, devices)
        assert dict(mesh.shape) == shape
        assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    two, _ = tpu_topology("v5p:4x4x4", num_slices=2)
    mesh = make_mesh([("dcn", 2), ("data", -1), ("fsdp", 8)], two)
    assert dict(mesh.shape) == {"dcn": 2, "data": 8, "fsdp": 8}
    # The 'dcn' axis is the one that crosses slices.
    assert {d.slice_index for d in mesh.devices[0].flat} == {0}


def test_captured_stderr_keeps_compiler_warnings_and_drops_libtpu_noise():
    from jaxsr.plan.capture import capture_stderr

    with capture_stderr() as log:
        os.write(2, b"WARNING: could not determine TPU accelerator type, please set env var "
                    b"`TPU_ACCELERATOR_TYPE` manually\n")
        os.write(2, b"I1206 10:00:00.000000   123 compiler.cc:10] just information\n")
        os.write(2, b"W1206 10:00:00.000000   123 spmd.cc:42] Involuntary full "
                    b"rematerialization of a tensor\n")
    assert log.warnings() == ["spmd.cc:42: Involuntary full rematerialization of a tensor"]


def test_collectives_count_each_loop_iteration():
    """An all-reduce inside a fori_loop of 5 steps counts 5 times per call."""
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxsr.parallel.mesh import make_mesh
    from jaxsr.plan.hlo import collectives
    from jaxsr.plan.topology import tpu_topology

    devices, _ = tpu_topology("v5e:2x2")
    mesh = make_mesh([("data", 4)], devices)
    x = jax.ShapeDtypeStruct((4, 256), np.float32, sharding=NamedSharding(mesh, P("data")))

    def counted(trips):
        f = jax.jit(lambda v: jax.lax.fori_loop(
            0, trips, lambda i, c: c * 0.5 + jnp_sum(c), v))
        return collectives(f.lower(x).compile().as_text())["all-reduce"]

    jnp_sum = lambda c: jax.numpy.sum(c, axis=0, keepdims=True)
    one, five = counted(1), counted(5)
    assert one["count"] >= 1
    assert five["count"] == 5 * one["count"]
    assert five["bytes"] == 5 * one["bytes"] == 5 * 256 * 4 * one["count"]
    # An all-reduce over 4 chips sends 2 x 3/4 of its buffer from each chip.
    assert five["wire_bytes"] == pytest.approx(1.5 * five["bytes"])


@pytest.mark.parametrize("axes", [[("data", 4), ("fsdp", 2)], [("data", 2), ("fsdp", 4)],
                                  [("data", 4), ("tensor", 2)], [("data", 2), ("tensor", 4)]])
def test_full_size_trainable_bytes_per_chip_shrink_with_fsdp_and_tensor(axes):
    """Full-size SeeSR trainable params (ControlNet + RCA, 3.0 GB in float32) per chip
    under the config's rules: 1/fsdp and 1/tensor of the replicated size within 10%."""
    from jaxsr.demo import model_configs
    from jaxsr.models import controlnet, unet
    from jaxsr.parallel.mesh import make_mesh
    from jaxsr.parallel.sharding import infer_shardings
    from jaxsr.plan.programs import bytes_per_chip
    from jaxsr.train.seesr_objective import split_unet

    config = seesr_train.get_config("base")
    u, c, *_ = model_configs(config.model)
    _, rca = split_unet(unet.param_shapes(u))
    trainable = {"controlnet": controlnet.param_shapes(c), "unet_rca": rca}
    rules = [tuple(r) for r in config.sharding.trainable]
    full = bytes_per_chip(trainable, infer_shardings(trainable, make_mesh([("data", 8)]),
                                                     rules))
    split = dict(axes).get("fsdp", 1) * dict(axes).get("tensor", 1)
    got = bytes_per_chip(trainable, infer_shardings(trainable, make_mesh(axes), rules))
    assert full > 2.9e9
    assert got == pytest.approx(full / split, rel=0.10)


def _tiny_train_config():
    """The tiny trainer with every trainable tensor large enough to split (its
    tensors are far below the base variant's 0.5 MB FSDP threshold)."""
    config = seesr_train.get_config("tiny")
    config.sharding.trainable = sharding_rules.tensor_parallel(
        [(".*", "fsdp(axis=fsdp, min_size_mb=0)")], fsdp_min_size_mb=0)
    return config


@pytest.fixture(scope="module")
def replicated_params_bytes():
    from jaxsr.parallel.mesh import make_mesh
    from jaxsr.plan.programs import seesr_train_program
    from jaxsr.plan.topology import tpu_topology
    from jaxsr.platform import compiling_for

    devices, _ = tpu_topology("v5e:2x2")
    with compiling_for("tpu"):
        program = seesr_train_program(_tiny_train_config(), make_mesh([("data", 4)], devices), 1)
    return program.argument_parts["params"]


# Each compile takes 4-5 minutes on 2 cores; the tensor mesh runs with -m slow (its
# per-chip bytes are checked exactly, from the shardings, by the full-size test above).
@pytest.mark.parametrize("axes", [
    [("data", 2), ("fsdp", 2)],
    pytest.param([("data", 2), ("tensor", 2)], marks=pytest.mark.slow)],
    ids=["data_x_fsdp", "data_x_tensor"])
def test_tiny_train_step_compiles_for_v5e_2x2(axes, replicated_params_bytes, tmp_path):
    from jaxsr.commands.plan import build_plan

    args = plan_args(mesh=repr(axes), batch_per_chip=1)
    report = build_plan(args, config=_tiny_train_config())
    json.dumps(report)                              # serialisable as written by --json
    assert REPORT_KEYS <= set(report) and MEMORY_KEYS <= set(report["memory"])
    assert set(report["collectives"]) == KINDS
    assert report["chips"] == 4 and report["chip"] == "v5e" and report["fits"]
    assert report["mesh"] == dict(axes)
    assert "remat off" in report["notes"][0]
    assert not [w for w in report["warnings"] if "remat" in w.lower()], report["warnings"]
    mem = report["memory"]
    assert mem["params"] == pytest.approx(replicated_params_bytes / 2, rel=0.10)
    # Adam's two moments are sharded like the params.
    assert mem["optimizer"] == pytest.approx(2 * mem["params"], rel=0.01)
    assert mem["temporaries"] > 0 and mem["total"] >= mem["arguments"]
    coll = report["collectives"]
    if "fsdp" in dict(axes):
        assert coll["all-gather"]["count"] > 0 and coll["reduce-scatter"]["count"] > 0
    else:
        assert coll["all-reduce"]["count"] > 0
    p = report["predicted"]
    assert p["step_s"] > 0 and 0 < p["mfu"] <= 1 and p["bound"] in ("compute", "memory",
                                                                      "collectives")
    assert p["images_per_s_per_chip"] == pytest.approx(
        report["images_per_step"] / 4 / p["step_s"])


def test_cli_writes_the_report_for_the_tiny_sampling_program(tmp_path, capfd):
    from jaxsr.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--program", "sample", "--config", "configs/seesr.py:tiny",
                 "--topology", "v5e:2x2", "--batch-per-chip", "1", "--size", "64",
                 "--steps", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report) and MEMORY_KEYS <= set(report["memory"])
    assert report["program"] == "seesr sample" and report["mesh"] == {"data": 4}
    assert report["memory"]["optimizer"] == 0 and report["fits"]
    assert report["flops_per_chip"] > 0
    printed = capfd.readouterr()
    assert "predicted (roofline)" in printed.out
    assert "TPU_ACCELERATOR_TYPE" not in printed.err


def _coser_held_bytes():
    """Every tiny CoSeR network's parameter bytes as the pipeline holds them (bfloat16
    kernels for the UNet and ControlNet, float32 for the rest)."""
    from flax import traverse_util

    from configs import coser
    from jaxsr.convert.coser_weights import CoSeRArchitecture
    from jaxsr.models import coser_controlnet, coser_unet, vae
    from jaxsr.models.cfw_vae import CFWConfig, cfw_param_shapes
    from jaxsr.models.cognitive import param_shapes as cognitive_shapes

    arch = CoSeRArchitecture.from_config(coser.get_config("tiny"))
    nbytes = lambda tree, dtype=None: sum(
        x.size * (2 if dtype is not None and k.endswith("kernel") else x.dtype.itemsize)
        for k, x in traverse_util.flatten_dict(tree, sep="/").items())
    return (nbytes(cognitive_shapes(arch.cognitive)) + nbytes(vae.param_shapes(arch.vae))
            + nbytes(coser_unet.param_shapes(arch.unet), "bf16")
            + nbytes(coser_controlnet.param_shapes(arch.controlnet), "bf16")
            + nbytes(cfw_param_shapes(arch.vae, CFWConfig())))


def test_tiny_coser_sampling_program_holds_every_network_and_traces():
    """CoSeR's reference-mode program (cognitive embedding, reference generation, SR
    pass, CFW decode) from configs/coser.py:tiny, data-parallel over v5e:2x2, built
    and traced from shapes: its replicated parameters are every network's held bytes,
    the CFW autoencoder's included. (Its TPU compile runs with -m slow.)"""
    from configs import coser
    from jaxsr.parallel.mesh import make_mesh
    from jaxsr.plan.coser_sample import coser_sample_program
    from jaxsr.plan.flops import jaxpr_flops
    from jaxsr.plan.topology import tpu_topology
    from jaxsr.platform import compiling_for

    devices, _ = tpu_topology("v5e:2x2")
    with compiling_for("tpu"):
        program = coser_sample_program(coser.get_config("tiny"),
                                       make_mesh([("data", -1)], devices), 1, 64, 2)
        traced = program.jitted.trace(*program.args)
    assert program.images_per_call == 4 and "CFW decoder" in program.notes[0]
    assert program.argument_parts["frozen"] == _coser_held_bytes()
    assert program.argument_parts["optimizer"] == 0
    assert jaxpr_flops(traced.jaxpr.jaxpr)["flops"] > 0


# Tiled mode at tiny sizes: a 32² LR enlarged x4 to 128², cut into 96² patches every
# 32 pixels (2 x 2 patches), each sampled in 8² latent tiles overlapping by 4.
TINY_TILED = ["--config.sampling.mode=tiled", "--config.sampling.input_size=64",
              "--config.sampling.patch_size=96", "--config.sampling.patch_stride=32",
              "--config.sampling.latent_tile=8", "--config.sampling.latent_tile_overlap=4"]


def test_tiny_coser_tiled_program_is_the_per_patch_call():
    """config.sampling.mode=tiled plans inference_tile.py's per-patch call: the batch
    is enlarged patches, the notes count the patches one output takes, the parameters
    held are the same as in reference mode."""
    from jaxsr.parallel.mesh import make_mesh
    from jaxsr.plan.coser_sample import coser_sample_program
    from jaxsr.plan.topology import tpu_topology
    from jaxsr.platform import compiling_for
    from jaxsr.train.config_file import load_config

    config = load_config("configs/coser.py:tiny", TINY_TILED)
    devices, _ = tpu_topology("v5e:2x2")
    with compiling_for("tpu"):
        program = coser_sample_program(config, make_mesh([("data", -1)], devices), 1, 128, 2)
        program.jitted.trace(*program.args)
    assert program.name == "coser sample (tiled)" and program.images_per_call == 4
    im_lq = program.args[2]
    assert im_lq.shape == (4, 96, 96, 3)
    assert "takes 4 patch(es)" in program.notes[0]
    assert program.argument_parts["frozen"] == _coser_held_bytes()


# 5-7 minutes of TPU compile on 2 cores: with -m slow (the default suite compiles the
# SeeSR sampling program for TPU, the CLI test above, and traces CoSeR's, just above).
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reference", "tiled"])
def test_tiny_coser_sampling_program_compiles_for_v5e_2x2(mode):
    """The same programs compiled by the TPU compiler: they fit, no compiler warnings,
    and the report's frozen bytes are the held bytes."""
    from jaxsr.commands.plan import build_plan

    tiled = mode == "tiled"
    args = plan_args(program="sample", config="configs/coser.py:tiny", size=128 if tiled
                     else 64, steps=2, batch_per_chip=1,
                     config_overrides=TINY_TILED if tiled else [])
    report = build_plan(args)
    assert report["program"] == ("coser sample (tiled)" if tiled else "coser sample")
    assert report["mesh"] == {"data": 4}
    assert report["chips"] == 4 and report["fits"] and report["flops_per_chip"] > 0
    assert report["images_per_step"] == 4
    assert "CFW decoder" in report["notes"][0]
    assert not [w for w in report["warnings"] if "remat" in w.lower()], report["warnings"]
    assert report["memory"]["frozen"] == _coser_held_bytes()
    assert report["memory"]["optimizer"] == 0


def test_replica_group_formats():
    from jaxsr.plan.hlo import replica_groups

    assert replica_groups("x, replica_groups={{0,1},{2,3}}, y") == [[0, 1], [2, 3]]
    assert replica_groups("x, replica_groups=[2,2]<=[4], y") == [[0, 1], [2, 3]]
    assert replica_groups("x, replica_groups=[2,2]<=[2,2]T(1,0), y") == [[0, 2], [1, 3]]
    assert replica_groups("source_target_pairs={{0,1},{1,0}}, x") == [[0, 1], [1, 0]]
    mesh = ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) "
            "{'axis_0'}, use")
    # devices laid [[0, 2], [1, 3]] over (axis_0, axis_1); groups vary along axis_0.
    assert replica_groups(mesh) == [[0, 1], [2, 3]]


def test_multislice_collectives_over_the_dcn_axis_are_counted_as_dcn():
    """Two v5e:2x2 slices: a sum over the 'dcn' axis crosses slices, one over 'data'
    stays inside each slice."""
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxsr.parallel.mesh import make_mesh
    from jaxsr.plan.hlo import collectives
    from jaxsr.plan.topology import tpu_topology

    devices, _ = tpu_topology("v5e:2x2", num_slices=2)
    assert {d.slice_index for d in devices} == {0, 1}
    mesh = make_mesh([("dcn", 2), ("data", 4)], devices)
    flat = list(mesh.devices.flat)
    assert [d.slice_index for d in flat] == [0] * 4 + [1] * 4

    def all_reduce_over(axis):
        x = jax.ShapeDtypeStruct((8, 1024), np.float32,
                                 sharding=NamedSharding(mesh, P(("dcn", "data"))))
        spec = P("data") if axis == "dcn" else P("dcn")
        f = jax.jit(lambda v: v.reshape(2, 4, 1024).sum(axis=0 if axis == "dcn" else 1),
                    out_shardings=NamedSharding(mesh, spec))
        text = f.lower(x).compile().as_text()
        got = collectives(text, slice_of=lambda i: flat[i].slice_index)
        return sum(v["wire_bytes"] for k, v in got.items() if isinstance(v, dict)), sum(
            v["dcn_wire_bytes"] for k, v in got.items() if isinstance(v, dict))

    wire, dcn = all_reduce_over("dcn")
    assert wire > 0 and dcn == wire
    wire, dcn = all_reduce_over("data")
    assert wire > 0 and dcn == 0


def test_a_program_larger_than_hbm_is_reported_as_not_fitting():
    """The TPU compiler refuses a program that needs more HBM than the chip has; the
    plan says so (fits False, the bytes the compiler asked for) instead of failing."""
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxsr.parallel.mesh import make_mesh
    from jaxsr.plan.programs import Program
    from jaxsr.plan.report import format_report, plan_program
    from jaxsr.plan.topology import tpu_topology

    devices, chip = tpu_topology("v5e:1x1")
    mesh = make_mesh([("data", 1)], devices)
    x = jax.ShapeDtypeStruct((6, 1024, 1024, 1024), np.float32,
                             sharding=NamedSharding(mesh, P()))
    program = Program("huge", jax.jit(lambda a: jnp.sin(a) * 2 + a), (x,), 1,
                      {"params": 0, "optimizer": 0, "frozen": 0, "batch": 24 * 2**30})
    report, compiled = plan_program(program, mesh, chip, "v5e:1x1", 1)
    assert compiled is None and report["fits"] is False
    assert REPORT_KEYS <= set(report)
    assert report["memory"]["total"] > chip.hbm_bytes
    assert "does NOT fit" in format_report(report)
