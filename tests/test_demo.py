"""`jaxsr demo`, the README's inference-only command, in a fresh process as a user runs it:
random tiny weights in `jaxsr convert`'s format, the built-in pictures, `jaxsr sr`.

Slow (about 2 min on 2 cores, mostly compiling): deselected in CI to keep it within
its time budget. `jaxsr sr` on real files of a converted tiny release runs in the
default suite (tests/test_cli_sr.py), as does a fresh-process user run of
`jaxsr quickstart` (tests/test_quickstart.py)."""

import json
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "jaxsr.cli", "demo", "--output", str(out),
                           "--steps", "1"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "written 3, skipped 0, failed 0" in done.stdout
    manifest = json.loads((out / "weights" / "manifest.json").read_text())
    assert manifest["model"] == "seesr"
    assert set(manifest["modules"]) == {"unet", "controlnet", "vae", "text_encoder", "dape"}
    inputs = sorted((out / "inputs").iterdir())
    assert len(inputs) == 3
    for src in inputs:
        with Image.open(src) as lr, Image.open(out / "outputs" / src.name) as sr:
            assert sr.size == (4 * lr.width, 4 * lr.height), src.name
