"""`jaxsr quickstart`, the README's main command, in a fresh process: the photos come
from an installed package, the tiny SeeSR trains through the real pipeline (TFDS folder
source → grain → on-device degradation → sharded step → orbax checkpoint), its loss
falls, and the held-out photo is super-resolved with the trained weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.parity import psnr_uint8

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_trains_and_super_resolves(tmp_path):
    work = tmp_path / "qs"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "jaxsr.cli", "quickstart", "--workdir",
                           str(work), "--steps", "20", "--sr-steps", "8"],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((work / "metrics.json").read_text())
    print(json.dumps(report, indent=1))
    assert report["train_steps"] == 20
    assert report["loss_last_quarter"] < report["loss_first_quarter"]
    assert np.isfinite(report["psnr"]) and -1 <= report["ssim"] <= 1
    # Without --metric-weights LPIPS is left out, and metrics.json says why.
    assert "lpips" not in report
    assert any("lpips" in n and "jaxsr convert --metric lpips" in n for n in report["notes"])
    strip = np.asarray(Image.open(work / "comparison.png"))
    assert strip.shape == (128, 3 * 128 + 8, 3)          # LR×4 | SR | HR
    # Sample images written during training (half-way and at the end): the held-out
    # photo's LR | SR | HR. The last one is made from the params being trained, on the
    # training mesh; it must equal the SR of the exported weights through the pipeline.
    samples = sorted((work / "train" / "samples").glob("step_*.png"))
    assert [p.name for p in samples] == ["step_0000010.png", "step_0000020.png"]
    last = np.asarray(Image.open(samples[-1]))
    assert last.shape == strip.shape
    sr_panel = slice(128 + 4, 2 * 128 + 4)
    psnr = psnr_uint8(last[:, sr_panel], strip[:, sr_panel])
    print(f"training sample vs exported-weights SR: PSNR {psnr:.1f} dB")
    assert psnr >= 40
    assert psnr_uint8(np.asarray(Image.open(samples[0]))[:, sr_panel], last[:, sr_panel]) < 60
    # Held-out evaluation at the sample steps (config.eval): its PSNR is that of the same
    # photo's SR, so it equals the last sample image's SR panel against its HR panel.
    rows = [json.loads(s) for s in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    held_out = {r["step"]: r for r in rows if "eval/psnr" in r}
    assert sorted(held_out) == [10, 20] and all("eval/ssim" in r for r in held_out.values())
    hr_panel = slice(2 * 128 + 8, 3 * 128 + 8)
    want = psnr_uint8(last[:, sr_panel], last[:, hr_panel])
    assert abs(held_out[20]["eval/psnr"] - want) <= 1e-5 * want
    assert (work / "train" / "checkpoints" / "20").is_dir()
    assert (work / "weights" / "manifest.json").is_file()
    assert any((work / "train" / "tensorboard").iterdir())
    # The photos are files of the installed package, copied, not downloaded.
    assert len(list((work / "data" / "samples" / "train").iterdir())) >= 3
