"""SeeSR training end to end on the tiny config: real images through the TFDS folder
source and grain, on-device degradation, the sharded step, orbax checkpoints.

- one device and a 4x2 data x fsdp mesh of 8 give the same losses, and the trainable
  params and their Adam moments really are FSDP-sharded;
- kill -9 then restart resumes and continues bitwise like an uninterrupted run; SIGTERM
  saves before exiting;
- two processes over localhost (2 devices each) train, checkpoint, and resume.

Subprocess runs share a persistent XLA compilation cache, so each distinct program
compiles once per test session. Each test compiles the tiny train step (about 2 min
on 2 CPU cores) once or twice, so they are marked slow; the quickstart test runs the
same path in the default suite:

    python -m pytest -m slow tests/test_train_seesr.py -s
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from jaxsr.train.config_file import load_config
from jaxsr.train.seesr_trainer import EXIT_TERMINATED, train

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "seesr_train.py") + ":tiny"
SHARD_ALL = "--config.sharding.trainable=[('.*', 'fsdp(axis=fsdp, min_size_mb=0)')]"


def _write_images(folder: Path, n: int = 12) -> None:
    """Photos-like test pictures: smooth gradients, blobs and edges, 72-96 px."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = rng.integers(72, 97, 2)
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), x * y], -1) * 0.4 + 0.5
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
        img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
        ext = "png" if i % 2 else "jpg"
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img_{i:02d}.{ext}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    _write_images(root / "images")
    return root


def _overrides(data: Path, *extra: str) -> list[str]:
    return [f"--config.data.source=folder:{data / 'images'}",
            f"--config.data.data_dir={data / 'tfds'}", "--config.log_every=1", *extra]


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_one_device_and_a_4x2_mesh_agree(data, tmp_path):
    steps = ["--config.total_steps=3", "--config.checkpoint_every=3"]
    one = load_config(CONFIG, _overrides(data, *steps,
                                         "--config.mesh=[('data', 1), ('fsdp', 1)]"))
    r1 = train(one, tmp_path / "one", devices=jax.devices()[:1])
    mesh8 = load_config(CONFIG, _overrides(data, *steps, SHARD_ALL,
                                           "--config.mesh=[('data', 4), ('fsdp', 2)]"))
    r8 = train(mesh8, tmp_path / "eight")
    l1, l8 = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    print("losses, 1 device:", l1, "\n        4x2 mesh:", l8)
    assert sorted(l1) == sorted(l8) == [1, 2, 3]
    np.testing.assert_allclose([l8[s] for s in (1, 2, 3)], [l1[s] for s in (1, 2, 3)],
                               rtol=2e-5)
    # Gradients differ only by float32 summation order, but Adam divides by √v, so an
    # element whose gradient is ~0 can move by up to ~3·lr per step either way; the
    # others must agree closely.
    diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
        jax.tree.leaves(r1.state.params), jax.tree.leaves(r8.state.params))])
    lr = one.optim.learning_rate
    print(f"params: max |diff| {diff.max():.2e}, {np.mean(diff > 1e-6):.2%} above 1e-6")
    assert diff.max() <= 3 * 3.2 * lr and np.mean(diff > 1e-6) < 0.05

    # Sharding: every trainable tensor with an even dimension is split over 'fsdp',
    # and Adam's moments are split the same way; the frozen networks are replicated.
    assert dict(r8.mesh.shape) == {"data": 4, "fsdp": 2}
    params = jax.tree_util.tree_flatten_with_path(r8.state.params)[0]
    adam = r8.state.opt_state[1][0]                 # chain(clip, adamw) -> adam state
    for (path, p), mu, nu in zip(params, jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
        spec = p.sharding.spec
        if any(d % 2 == 0 for d in p.shape):
            assert "fsdp" in spec, (jax.tree_util.keystr(path), spec)
        assert mu.sharding.spec == spec and nu.sharding.spec == spec
    kernel = r8.state.params["controlnet"]["controlnet_mid_block"]["kernel"]   # [1,1,C,C]
    assert kernel.sharding.spec == P(None, None, "fsdp", None)   # the first largest dim
    assert kernel.addressable_shards[0].data.shape[2] == kernel.shape[2] // 2
    for leaf in jax.tree.leaves(r8.frozen):
        assert leaf.sharding.spec == P()


# ------------------------------------------------------------- subprocess runs
def _env(cache: Path, devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT))
    return env


def _train_cmd(workdir: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxsr.cli", "train", "--config", CONFIG, "--workdir",
            str(workdir), *_overrides(data, *extra)]


def _saved(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
        if folder.is_dir() else []


def _wait_for_step(proc, workdir: Path, step: int, timeout: float = 600,
                   checkpoint: bool = False) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ((workdir / "metrics.jsonl").exists() and max(_losses(workdir), default=0) >= step
                and (_saved(workdir) or not checkpoint)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.mark.slow
def test_kill_9_resumes_exactly_and_sigterm_saves(data, cache, tmp_path):
    steps = ["--config.total_steps=6", "--config.checkpoint_every=2"]
    env = _env(cache)
    straight = tmp_path / "straight"
    done = subprocess.run(_train_cmd(straight, data, *steps), env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    want = _losses(straight)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, data, *steps), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(proc, killed, 3, checkpoint=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = _saved(killed)
    assert saved and saved[-1] < 6, saved
    again = subprocess.run(_train_cmd(killed, data, *steps), env=env, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {saved[-1]}" in again.stdout, again.stdout
    got = _losses(killed)        # the lines after the resume overwrite the re-run steps
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(saved[-1] + 1, 7):
        assert got[step] == want[step], (step, got[step], want[step])   # bitwise

    termed = tmp_path / "termed"
    proc = subprocess.Popen(_train_cmd(termed, data, "--config.total_steps=1000",
                                       "--config.checkpoint_every=1000"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, termed, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_TERMINATED, err[-3000:]
    last = max(_losses(termed))
    assert f"SIGTERM: saved step {last}" in out, out
    assert (termed / "checkpoints" / str(last)).is_dir()


@pytest.mark.slow
def test_two_processes_train_and_resume(data, cache, tmp_path):
    workdir = tmp_path / "run"
    env = _env(cache)
    env.pop("XLA_FLAGS")

    def launch(total: int):
        # launch/local.sh gives each process --coordinator/--num-processes/--process-id.
        cmd = ["bash", str(ROOT / "launch" / "local.sh"), "2", "train", "--config", CONFIG,
               "--workdir", str(workdir),
               *_overrides(data, f"--config.total_steps={total}",
                           "--config.checkpoint_every=2",
                           "--config.mesh=[('data', 2), ('fsdp', 2)]", SHARD_ALL)]
        done = subprocess.run(cmd, env={**env, "DEVICES_PER_PROCESS": "2",
                                        "PYTHON": sys.executable},
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    first = launch(2)
    assert "mesh {'data': 2, 'fsdp': 2} over 4 devices, 2 process(es)" in first, first
    assert (workdir / "checkpoints" / "2").is_dir()
    second = launch(4)
    assert "resumed from step 2" in second, second
    losses = _losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert (workdir / "checkpoints" / "4").is_dir()
