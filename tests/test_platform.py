"""jaxsr's default XLA:CPU flags (jaxsr/platform.py): they reach XLA in a fresh
process, keep convolutions out of YNNPACK, and leave the UNet's results at PyTorch
parity; a user's own setting wins."""

import json
import os
import subprocess
import sys
from pathlib import Path

from jaxsr import platform

# Runs in a fresh process: XLA reads XLA_FLAGS once, when its backend starts.
_SCRIPT = r"""
import json, re
from jaxsr.platform import configure_xla_defaults
flags = configure_xla_defaults()
import diffusers, jax, numpy as np, torch
from jaxsr.convert.networks import load_unet
from jaxsr.models.unet import UNet2DConditionModel, UNetConfig
from tests.parity import nchw_to_nhwc, nhwc_to_nchw, rel_err, torch_state
from tests.test_unet import TINY, _inputs, randomize_
from jaxsr.nn import attention, transformer

# Step budgets small enough that the tiny UNet takes the CPU's row-chunk loops (per
# (batch, head) attention chunks of 256 rows, feed-forward steps of 256 rows), which
# jaxsr's defaults reserve for larger maps.
attention.MAX_ITEM_LOGITS = attention.CPU_STEP_LOGITS = 1 << 18
transformer.CPU_FF_STEP_FLOATS = 1 << 15
transformer.CPU_FF_MIN_STEP_ROWS = 0

torch.manual_seed(0)
ref = diffusers.UNet2DConditionModel(**TINY).eval()
randomize_(ref)
cfg = UNetConfig.from_diffusers_config(dict(ref.config))
params = {"params": load_unet(torch_state(ref), cfg)}
# 32x32 latent: 1024 tokens at level 0, which the budgets above split into steps.
x, t, ctx = _inputs(cfg, size=32)
with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
model = UNet2DConditionModel(cfg)
compiled = jax.jit(model.apply).lower(params, nchw_to_nhwc(x), t, ctx).compile()
got = compiled(params, nchw_to_nhwc(x), t, ctx)
hlo = compiled.as_text()
ynn = re.findall(r"calls=%([\w.-]+).*__ynn_fusion", hlo)
bodies = dict(re.findall(r"^%([\w.-]+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M))
print(json.dumps({
    "flags": flags, "rel_err": float(rel_err(nhwc_to_nchw(got), want)),
    "ynn_fusions": len(ynn),
    "ynn_with_conv": sum("convolution(" in bodies.get(name, "") for name in ynn),
    "ynn_with_dot": sum(" dot(" in bodies.get(name, "") for name in ynn),
    "convolutions": hlo.count(" convolution("),
    "loops": hlo.count(" while("),
}))
"""


def test_default_flags_keep_unet_parity_and_convolutions_out_of_ynnpack():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXSR_NO_XLA_DEFAULTS")}
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, env=env, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "--xla_cpu_experimental_ynn_fusion_type=individual_dot" in got["flags"]
    assert got["rel_err"] <= 1e-5, got
    # YNNPACK still runs the dots; every convolution is XLA's own.
    assert got["ynn_fusions"] > 0 and got["ynn_with_dot"] == got["ynn_fusions"], got
    assert got["ynn_with_conv"] == 0 and got["convolutions"] > 0, got
    assert got["loops"] > 0, got          # the row-chunk paths were the ones compared


def test_a_users_own_flag_wins_and_opt_out(monkeypatch):
    name = "--xla_cpu_experimental_ynn_fusion_type"
    scheduler = "--xla_cpu_enable_concurrency_optimized_scheduler"
    monkeypatch.delenv("JAXSR_NO_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {name}=")
    assert platform.configure_xla_defaults().split() == [
        "--xla_force_host_platform_device_count=2", f"{name}=", f"{scheduler}=false"]
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {scheduler}=1")
    assert platform.configure_xla_defaults().split() == [
        "--xla_force_host_platform_device_count=2", f"{scheduler}=1",
        f"{name}=individual_dot"]
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAXSR_NO_XLA_DEFAULTS", "1")
    assert platform.configure_xla_defaults() == ""


# Compiles the tiny SeeSR sampling program in bfloat16 (which this CPU may emulate) in
# a fresh process and reports its scratch memory beside the float32 size of the
# UNet's and ControlNet's kernels.
_SAMPLER_SCRIPT = r"""
import json, tempfile
from pathlib import Path
from jaxsr.platform import configure_xla_defaults
configure_xla_defaults()
import jax, jax.numpy as jnp
from flax import traverse_util
from configs import seesr as seesr_config
from jaxsr.demo import write_random_seesr
from jaxsr.pipelines.seesr import SeeSROptions, SeeSRPipeline
folder = write_random_seesr(Path(tempfile.mkdtemp()) / "w", seesr_config.get_config("tiny"),
                            log=lambda *_: None)
pipe = SeeSRPipeline.from_pretrained(folder, dtype="bfloat16", devices=jax.devices()[:1])
opts = SeeSROptions(steps=1)
text = jnp.zeros((1, 2, 77, pipe.weights.text_encoder[0].hidden_size))
ram = jnp.zeros((1, 145, pipe.weights.dape[0].embed_width))
compiled = pipe._restore_fn(pipe._settings(opts)).lower(
    pipe.params, pipe._plan(opts), jnp.zeros((1, 64, 64, 3)), text, ram,
    jax.vmap(jax.random.key)(jnp.arange(1)), None).compile()
kernels = sum(v.size * 4 for m in ("unet", "controlnet")
              for k, v in traverse_util.flatten_dict(pipe.params[m], sep="/").items()
              if k.endswith("kernel"))
print(json.dumps({"temp": compiled.memory_analysis().temp_size_in_bytes, "kernels_f32": kernels}))
"""


def test_bfloat16_sampling_does_not_keep_float32_copies_of_the_weights():
    """Where XLA:CPU computes bfloat16 layers in float32, it copies each weight to
    float32. With jaxsr's flags (and the sampling loop's optimization barrier) each
    copy lives only for its layer; with XLA's defaults every copy is alive at once,
    which cost full-size SeeSR 5.5 GB (benchmarks/sr_memory.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXSR_NO_XLA_DEFAULTS")}
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parent.parent
    got = {}
    for name, extra in (("jaxsr", {}), ("xla defaults", {"JAXSR_NO_XLA_DEFAULTS": "1"})):
        proc = subprocess.run([sys.executable, "-c", _SAMPLER_SCRIPT], cwd=root,
                              env={**env, **extra}, text=True, capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = got["jaxsr"]["kernels_f32"]
    print(f"\nscratch {got['jaxsr']['temp']:,} B with jaxsr's flags, "
          f"{got['xla defaults']['temp']:,} B with XLA's; kernels in float32 {kernels:,} B")
    assert got["jaxsr"]["temp"] < 0.25 * kernels, got
    if platform.auto_compute_dtype("cpu") == "float32":
        # bfloat16 is emulated here: without the flags the copies are all there, which
        # shows the first bound measures what it should.
        assert got["xla defaults"]["temp"] >= kernels, got
