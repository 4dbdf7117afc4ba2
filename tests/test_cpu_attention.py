"""The fused CPU attention kernel (jaxsr/kernels/cpu_attention.cc) against a float64
numpy softmax attention, on every code path this CPU can run (AVX-512, AVX2+FMA and
the baseline vectors are selected with JAXSR_CPU_ATTENTION_ISA, capped by the CPU).

Shapes cover what the kernel tiles by: query rows in blocks of 64, keys in blocks of
128 padded to 32, head sizes 32/64/128, so lengths that are not multiples (1, 45,
77, 300) exercise the padding of both.
"""

import functools
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsr.kernels import ISA_NAMES, cpu_attention_isa
from jaxsr.nn import attention
from jaxsr.nn.cpu_attention import fused_cpu_attention_preferred
from jaxsr.parallel.mesh import make_mesh
from tests.parity import rel_err
from tests.test_attention import numpy_attention

_BUILT_ISA = cpu_attention_isa()
_PATHS = [isa for isa in sorted(ISA_NAMES, reverse=True)
          if _BUILT_ISA is not None and isa <= _BUILT_ISA]


def fused(q, k, v, **kw):
    return jax.jit(functools.partial(attention.dot_product_attention, backend="fused_cpu",
                                     **kw))(q, k, v)


def qkv(b, lq, lk, h, d, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, lq, h, d)).astype(np.float32) * spread
    k, v = (rng.standard_normal((b, lk, h, d)).astype(np.float32) for _ in range(2))
    return q, k, v


def test_the_kernel_is_built_where_a_compiler_exists():
    """setup.py builds it with the package; an install that silently lost it would
    only show up as slower attention."""
    if platform.system() == "Linux" and (shutil.which("c++") or shutil.which("g++")):
        assert _BUILT_ISA is not None, "jaxsr/kernels/_cpu_attention*.so is missing"
    if platform.machine() == "x86_64" and _BUILT_ISA is not None:
        flags = open("/proc/cpuinfo").read().split("\nflags")[1].split("\n")[0].split()
        want = 4 if "avx512f" in flags and "avx512vl" in flags else (
            3 if "avx2" in flags and "fma" in flags else 0)
        assert _BUILT_ISA == want
    assert fused_cpu_attention_preferred() == (_BUILT_ISA == 4)


@pytest.fixture(params=_PATHS, ids=lambda isa: ISA_NAMES[isa].split()[0])
def isa(request, monkeypatch):
    monkeypatch.setenv("JAXSR_CPU_ATTENTION_ISA", str(request.param))
    assert cpu_attention_isa() == request.param
    return request.param


@pytest.mark.parametrize("b,lq,lk,h,d", [
    (2, 300, 77, 3, 64),     # text cross-attention; 300 = 4 blocks of 64 + 44
    (1, 64, 1, 2, 32),       # a single key
    (1, 45, 45, 1, 128),     # fewer rows and keys than one tile
    (2, 129, 300, 2, 64),    # 3 key blocks, the last one partly padding
])
def test_matches_numpy_on_every_code_path(isa, b, lq, lk, h, d):
    q, k, v = qkv(b, lq, lk, h, d, seed=lq + lk + d)
    out = fused(q, k, v)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert rel_err(out, numpy_attention(q, k, v)) <= 2e-6


def test_online_softmax_rescales_when_a_later_block_holds_the_max(isa):
    """Logits up to ~±400 whose row maxima sit in the last of three key blocks: the
    running max moves up block by block and what was summed under the old max must
    be rescaled (an error there is off by factors like e^100, not rounding)."""
    q, k, v = qkv(1, 70, 300, 2, 64, seed=3, spread=6.0)
    k[:, 256:] *= 4.0
    want = numpy_attention(q, k, v)
    assert rel_err(fused(q, k, v), want) <= 2e-6
    k = k[:, ::-1].copy()                     # maxima in the first block instead
    v = v[:, ::-1].copy()
    assert rel_err(fused(q, k, v), want) <= 2e-6


def test_scale_argument():
    q, k, v = qkv(1, 64, 96, 2, 32, seed=5)
    want = numpy_attention(q * (0.3 * np.sqrt(32)), k, v)
    assert rel_err(fused(q, k, v, scale=0.3), want) <= 2e-6


def test_a_batch_item_does_not_depend_on_the_batch():
    q, k, v = qkv(3, 200, 150, 2, 64, seed=9)
    one, three = fused(q[:1], k[:1], v[:1]), fused(q, k, v)
    np.testing.assert_array_equal(np.asarray(one)[0], np.asarray(three)[0])


def test_gradients_equal_the_xla_backends():
    """The kernel's backward pass is the XLA attention's, so training through "auto"
    attention on a CPU gets the same gradients."""
    q, k, v = qkv(1, 100, 130, 2, 64, seed=11)
    w = np.random.default_rng(12).standard_normal(q.shape).astype(np.float32)

    def loss(backend, q, k, v):
        return jnp.sum(attention.dot_product_attention(q, k, v, backend=backend) * w)

    got = jax.grad(functools.partial(loss, "fused_cpu"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        assert rel_err(g, r) <= 1e-5


def test_bfloat16_inputs_and_vmap():
    q, k, v = qkv(2, 64, 77, 2, 64, seed=13)
    low = fused(*(t.astype(jnp.bfloat16) for t in (q, k, v)))
    assert low.dtype == jnp.bfloat16
    assert rel_err(low.astype(np.float32), numpy_attention(q, k, v)) <= 2e-2
    stacked = jax.vmap(lambda a, b, c: attention.dot_product_attention(
        a, b, c, backend="fused_cpu"))(q[:, None], k[:, None], v[:, None])
    assert rel_err(stacked[:, 0], numpy_attention(q, k, v)) <= 2e-6


def test_inside_a_batch_sharded_program():
    """Under a 4-device batch sharding the call still computes every item right."""
    mesh = make_mesh([("data", 4)], jax.devices()[:4])
    q, k, v = qkv(4, 64, 77, 2, 64, seed=17)
    spec = NamedSharding(mesh, P("data"))
    args = [jax.device_put(t, spec) for t in (q, k, v)]
    out = jax.jit(functools.partial(attention.dot_product_attention, backend="fused_cpu"),
                  out_shardings=spec)(*args)
    assert rel_err(out, numpy_attention(q, k, v)) <= 2e-6


def test_calls_it_cannot_take_say_why():
    q, k, v = qkv(1, 8, 8, 1, 16)
    with pytest.raises(ValueError, match="head size 16"):
        fused(q, k, v)
    q, k, v = qkv(1, 8, 8, 1, 32)
    with pytest.raises(ValueError, match="no mask"):
        attention.dot_product_attention(q, k, v, backend="fused_cpu",
                                        mask=np.ones((1, 1, 8, 8), bool))
    # "auto" falls back to XLA ops instead.
    got = attention.dot_product_attention(q, k, v, backend="auto",
                                          mask=np.ones((1, 1, 8, 8), bool))
    assert rel_err(got, numpy_attention(q, k, v)) <= 1e-5
