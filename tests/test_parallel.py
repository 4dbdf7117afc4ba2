"""Mesh construction and config-driven parameter sharding on 8 host CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxsr.parallel.arrays import check_batch_divisible, global_batch, to_host
from jaxsr.parallel.mesh import batch_sharding, make_mesh, resolve_axis_sizes
from jaxsr.parallel.sharding import fsdp_spec, infer_shardings, shard_params


def test_resolve_axis_sizes():
    assert resolve_axis_sizes([("data", -1), ("fsdp", 2)], 8) == [("data", 4), ("fsdp", 2)]
    with pytest.raises(ValueError, match="at most one"):
        resolve_axis_sizes([("data", -1), ("fsdp", -1)], 8)
    with pytest.raises(ValueError, match="do not divide"):
        resolve_axis_sizes([("data", -1), ("fsdp", 3)], 8)
    with pytest.raises(ValueError, match="needs 6 devices"):
        resolve_axis_sizes([("data", 3), ("fsdp", 2)], 8)


def test_mesh_shape_and_batch_sharding():
    assert len(jax.devices()) == 8
    mesh = make_mesh([("data", 4), ("fsdp", 2)])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    x = global_batch(np.arange(16 * 3, dtype=np.float32).reshape(16, 3), batch_sharding(mesh))
    assert x.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(to_host(x), np.arange(48, dtype=np.float32).reshape(16, 3))
    with pytest.raises(ValueError, match="not divisible"):
        check_batch_divisible(12, mesh)


def test_fsdp_spec_picks_largest_divisible_dim():
    assert fsdp_spec((3, 1024, 512), 4, "fsdp", 2, 0) == P(None, "fsdp", None)
    assert fsdp_spec((1023, 512), 4, "fsdp", 2, 0) == P(None, "fsdp")
    assert fsdp_spec((7, 9), 4, "fsdp", 2, 0) == P()
    assert fsdp_spec((1024, 1024), 4, "fsdp", 2, min_size_mb=8) == P()   # 4 MiB < 8 MiB


def test_infer_shardings_first_match_wins_and_shards_for_real():
    mesh = make_mesh([("data", 2), ("fsdp", 4)])
    tree = {"frozen": {"w": jnp.zeros((512, 1024))},
            "train": {"w": jnp.zeros((512, 1024)), "b": jnp.zeros((1024,))}}
    strategy = [(".*frozen.*", "replicate"), (".*", "fsdp(axis=fsdp, min_size_mb=1)")]
    shardings = infer_shardings(tree, mesh, strategy)
    assert shardings["frozen"]["w"].spec == P()
    assert shardings["train"]["w"].spec == P(None, "fsdp")
    assert shardings["train"]["b"].spec == P()            # 4 KiB: below min size
    placed = shard_params(jax.tree.map(np.asarray, tree), shardings)
    assert placed["train"]["w"].addressable_shards[0].data.shape == (512, 256)
    with pytest.raises(ValueError, match="no sharding rule"):
        infer_shardings(tree, mesh, [(".*frozen.*", "replicate")])
    with pytest.raises(ValueError, match="unknown sharding rule"):
        infer_shardings(tree, mesh, [(".*", "shard_everything")])
