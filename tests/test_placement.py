"""Inference parameter placement: kernels held in bfloat16 give bit-identical network
outputs; weights stream from a converted folder onto the devices with no host copy
left; the memory check refuses what cannot fit before reading a tensor."""

import json
import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import coser as coser_config
from configs import seesr as seesr_config
from jaxsr.cli import main as cli_main
from jaxsr.convert.cache import load_converted, tensor_info
from jaxsr.convert.coser_weights import CoSeRArchitecture
from jaxsr.demo import model_configs, random_params, write_random_seesr
from jaxsr.models import clip_text, controlnet, coser_controlnet, coser_unet, unet
from jaxsr.parallel.mesh import make_mesh
from jaxsr.pipelines import memory
from jaxsr.pipelines.placement import Placement, held_bytes, held_dtype
from jaxsr.pipelines.seesr import SeeSRPipeline


def _replicated():
    return NamedSharding(make_mesh((("data", -1),), jax.devices()[:1]), P())


def test_held_dtype_rule():
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert held_dtype("down_blocks_0/resnets_0/conv1/kernel", np.float32, jnp.bfloat16) == bf16
    assert held_dtype("ff/net_0/proj/kernel", bf16, jnp.bfloat16) == bf16
    for key in ("conv1/bias", "norm1/scale", "token_embedding/embedding", "query_tokens"):
        assert held_dtype(key, np.float32, jnp.bfloat16) == np.float32
    # float32 networks hold float32 whatever the folder stores; integers are untouched
    assert held_dtype("conv1/kernel", bf16, jnp.float32) == np.float32
    assert held_dtype("position_ids", np.int64, jnp.bfloat16) == np.int64


def _random_inputs(inputs, seed):
    rng = np.random.default_rng(seed)

    def draw(x):
        if x is None or not jnp.issubdtype(x.dtype, jnp.floating):
            return None if x is None else jnp.full(x.shape, 501, x.dtype)
        return jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))

    return jax.tree_util.tree_map(draw, inputs, is_leaf=lambda x: x is None)


def _networks():
    seesr = model_configs(seesr_config.get_config("tiny"))
    arch = CoSeRArchitecture.from_config(coser_config.get_config("tiny"))
    return {
        "seesr-unet": (unet.UNet2DConditionModel, seesr[0], unet.dummy_inputs(seesr[0])),
        "seesr-controlnet": (controlnet.ControlNetModel, seesr[1],
                             controlnet.dummy_inputs(seesr[1])),
        "text-encoder": (clip_text.CLIPTextModel, seesr[3], (np.arange(77)[None] % 40,)),
        "coser-unet": (coser_unet.CoSeRUNet, arch.unet, coser_unet.dummy_inputs(arch.unet)),
        "coser-controlnet": (coser_controlnet.CoSeRControlNet, arch.controlnet,
                             coser_controlnet.dummy_inputs(arch.controlnet)),
    }


@pytest.mark.parametrize("name", ["seesr-unet", "seesr-controlnet", "text-encoder",
                                  "coser-unet", "coser-controlnet"])
def test_bfloat16_kernels_compute_exactly_what_float32_kernels_did(name):
    """Each bfloat16 network, once with its float32 params and once with the held ones
    (kernels in bfloat16, the rest float32): the same bits out."""
    cls, cfg, inputs = _networks()[name]
    model = cls(cfg, dtype=jnp.bfloat16)
    params = random_params(model, *inputs, seed=3)
    held = Placement({"net": jnp.bfloat16}, _replicated()).tree("net", params)
    x = _random_inputs(inputs, seed=4) if name != "text-encoder" else inputs
    run = jax.jit(lambda p: model.apply({"params": p}, *x))
    want, got = run(params), run(held)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    flat = traverse_util.flatten_dict(held, sep="/")
    assert all(v.dtype == (jnp.bfloat16 if k.endswith("/kernel") else jnp.float32)
               for k, v in flat.items())


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_random_seesr(tmp_path_factory.mktemp("w") / "seesr",
                              seesr_config.get_config("tiny"), log=lambda *_: None)


def test_streamed_load_places_every_tensor_once(tiny_folder):
    """`load_converted(leaf=...)` calls leaf once per stored tensor, in the held dtype,
    and the pipeline keeps device arrays only (no numpy tree)."""
    place = Placement({"unet": jnp.bfloat16, "vae": jnp.float32}, _replicated())
    seen = []

    def leaf(module, key, array):
        seen.append((module, key))
        return place.leaf(module, key, array)

    placed = load_converted(tiny_folder, ["unet", "vae"], leaf=leaf)
    plain = load_converted(tiny_folder, ["unet", "vae"])
    info = tensor_info(tiny_folder, ["unet", "vae"])
    assert sorted(seen) == sorted((m, k) for m in info for k in info[m])
    for module in ("unet", "vae"):
        got = traverse_util.flatten_dict(placed[module][1], sep="/")
        want = traverse_util.flatten_dict(plain[module][1], sep="/")
        assert got.keys() == want.keys()
        for key, value in got.items():
            assert isinstance(value, jax.Array)
            assert value.dtype == held_dtype(key, np.float32, place.modules[module])
            np.testing.assert_array_equal(np.asarray(value, np.float32),
                                          want[key].astype(value.dtype).astype(np.float32))
        # the estimate from headers alone equals what was placed
        assert held_bytes(info[module], place.modules[module]) == sum(
            v.size * v.dtype.itemsize for v in got.values())

    pipe = SeeSRPipeline.from_pretrained(tiny_folder, dtype="bfloat16", devices=jax.devices()[:1])
    assert pipe.weights.unet[1] is None and pipe.weights.dape[1] is None
    leaves = jax.tree_util.tree_leaves((pipe.params, pipe.text_params, pipe.dape_params))
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    kernels = traverse_util.flatten_dict(pipe.params["unet"], sep="/")
    kernel_dtypes = {v.dtype for k, v in kernels.items() if k.endswith("kernel")}
    assert kernel_dtypes == {jnp.dtype(jnp.bfloat16)}
    vae = jax.tree_util.tree_leaves(pipe.params["vae"])
    assert {v.dtype for v in vae} == {jnp.dtype(jnp.float32)}


def test_check_fits_message_and_hints():
    cpu = jax.devices()[:4]
    memory.check_fits(1 * memory.GB, 1 * memory.GB, cpu[:1], what="x",
                      free_bytes=3 * memory.GB)
    with pytest.raises(memory.InsufficientMemoryError) as e:
        memory.check_fits(3 * memory.GB, 1 * memory.GB, cpu, what="SeeSR (float32)",
                          smaller_param_bytes=int(1.5 * memory.GB), free_bytes=7 * memory.GB)
    msg = str(e.value)
    assert "needs ~13.0 GB of host memory" in msg and "7.0 GB is free" in msg
    assert "--dtype bfloat16" in msg and "--devices 1" in msg


def _sparse_module(path, key, shape):
    """A .safetensors file whose one float32 tensor is never written (a sparse file):
    the header says how large it is, which is all the memory check reads."""
    header = json.dumps({key: {"dtype": "F32", "shape": list(shape),
                               "data_offsets": [0, 4 * math.prod(shape)]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 4 * math.prod(shape))


def test_sr_refuses_weights_larger_than_memory(tiny_folder, tmp_path, capsys):
    """`jaxsr sr` on a folder whose UNet header claims 4 TB: a one-line message with the
    estimate and exit status 2, before a tensor is read."""
    import shutil

    from PIL import Image

    folder = tmp_path / "huge"
    shutil.copytree(tiny_folder, folder)
    _sparse_module(folder / "unet.safetensors", "conv_in/kernel", (1 << 20, 1 << 20))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(photo)
    code = cli_main(["sr", str(photo), "--weights", str(folder), "--output",
                     str(tmp_path / "out"), "--devices", "1", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"SeeSR \(float32\) from .* needs ~\d+\.\d GB of host memory "
                     r"\(4096\.\d GB of weights per device, .*\d GB is free", err), err
    assert not (tmp_path / "out" / "photo.png").exists()
