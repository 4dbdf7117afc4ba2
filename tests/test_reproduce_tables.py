"""benchmarks/reproduce_tables.py as a user runs it (a fresh process): random tiny SeeSR
weights in `jaxsr convert`'s format, LPIPS weights converted by `jaxsr convert --metric`
from a random AlexNet and the real LPIPS head, two small test sets cut from
scikit-image photos; the real `jaxsr sr` and `jaxsr eval` underneath."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from configs import seesr as seesr_config
from jaxsr.cli import main as jaxsr
from jaxsr.demo import write_random_seesr
from tests import metric_references as R

ROOT = Path(__file__).resolve().parent.parent
HR_SIZE = 64                 # LR 16x16; 4x gives 64x64, the tiny SeeSR's one compile
# Two images per set, run as one batch: both sets share one compiled program.
SETS = {"div2k-val": ("astronaut", "coffee"), "my-photos": ("rocket", "chelsea")}


def write_set(folder: Path, photos) -> tuple[Path, Path]:
    """HR crops and their 4x bicubic LR, as <folder>/hr and <folder>/lr."""
    hr, lr = folder / "hr", folder / "lr"
    hr.mkdir(parents=True)
    lr.mkdir()
    for name in photos:
        img = getattr(skimage.data, name)()[:HR_SIZE, :HR_SIZE, :3]
        Image.fromarray(img).save(hr / f"{name}.png")
        small = Image.fromarray(img).resize((HR_SIZE // 4, HR_SIZE // 4), Image.BICUBIC)
        small.save(lr / f"{name}.png")
    return lr, hr


def write_lpips_weights(folder: Path, tmp: Path) -> None:
    """A random AlexNet trunk (torchvision's file layout) with the LPIPS package's real
    alex.pth head, converted by the real `jaxsr convert --metric lpips`."""
    features = R.alexnet_features()
    R.randomize_trunk(features, 0)
    trunk = tmp / "alexnet-owt-7be5be79.pth"
    torch.save({k: v.contiguous() for k, v in R.torchvision_file_state(features, 0).items()},
               trunk)
    assert jaxsr(["convert", "--metric", "lpips", "--from", str(trunk),
                  str(R.lpips_head_file("alex")), "--output", str(folder)]) == 0


def section(stdout: str, name: str) -> list[str]:
    """The lines of the table printed for set `name` (up to the next set's header)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"== {name}:"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("== ")),
               len(lines))
    return lines[start:end]


def cells(lines: list[str], metric: str) -> list[str]:
    row = next(line for line in lines if line.split() and line.split()[0] == metric)
    return row.split()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tables")
    write_random_seesr(tmp / "weights", seesr_config.get_config("tiny"))
    write_lpips_weights(tmp / "metric_weights", tmp)
    argv = [sys.executable, str(ROOT / "benchmarks" / "reproduce_tables.py"),
            "--model", "seesr", "--weights", str(tmp / "weights"),
            "--metric-weights", str(tmp / "metric_weights"), "--metrics", "psnr,ssim,lpips",
            "--steps", "2", "--process-size", "32", "--work", str(tmp / "work"),
            "--json", str(tmp / "tables.json"),
            "--sr-args=--devices 1 --dtype float32 --batch-size 2 --compile-cache "
            + shlex.quote(str(tmp / "xla-cache"))]
    for name, photos in SETS.items():
        lr, hr = write_set(tmp / "sets" / name, photos)
        argv += ["--set", f"{name}={lr}:{hr}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp)
    return tmp, done


def test_script_exits_zero_with_every_output(run):
    tmp, done = run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, photos in SETS.items():
        outputs = sorted(p.name for p in (tmp / "work" / name / "sr").iterdir())
        assert outputs == sorted(f"{p}.png" for p in photos), name
        for photo in photos:
            with Image.open(tmp / "sets" / name / "lr" / f"{photo}.png") as lr, \
                    Image.open(tmp / "work" / name / "sr" / f"{photo}.png") as sr:
                assert sr.size == (4 * lr.width, 4 * lr.height), (name, photo)


def test_json_means_are_eval_summaries(run):
    tmp, done = run
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp / "tables.json").read_text())
    assert set(report["sets"]) == set(SETS)
    assert report["options"]["crop_border"] == 0 and not report["options"]["y_channel"]
    assert report["environment"]["jax"]
    for name, photos in SETS.items():
        summary = json.loads((tmp / "work" / name / "eval" / "summary.json").read_text())
        ours = report["sets"][name]["ours"]
        assert list(ours) == ["psnr", "ssim", "lpips"]
        assert ours == {k: m["mean"] for k, m in summary["metrics"].items()}
        assert report["sets"][name]["counts"] == {"scored": len(photos), "skipped": 0}
        # Random weights give noisy pictures, but the scores are real numbers in range.
        assert all(np.isfinite(v) for v in ours.values()) and 0 < ours["lpips"] < 1
    published = report["sets"]["div2k-val"]["published"]
    assert [p["label"] for p in published] == ["OSEDiff re-run", "SeeSR paper"]
    assert published[0]["values"]["lpips"] == 0.3194 and "2406.08177" in published[0]["source"]
    assert report["sets"]["my-photos"]["published"] == []


def test_tables_show_published_columns_only_where_published(run):
    tmp, done = run
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp / "tables.json").read_text())
    div2k = section(done.stdout, "div2k-val")
    assert "published: OSEDiff re-run" in div2k[1] and "published: SeeSR paper" in div2k[1]
    ours = report["sets"]["div2k-val"]["ours"]
    # LPIPS: ours, then the OSEDiff re-run's value; the SeeSR paper column is blank.
    assert cells(div2k, "LPIPS↓") == ["LPIPS↓", f"{ours['lpips']:.4f}", "0.3194"]
    assert cells(div2k, "PSNR↑") == ["PSNR↑", f"{ours['psnr']:.4f}"]
    # FID is published by both sources but was not measured here: its row still shows.
    assert cells(div2k, "FID↓") == ["FID↓", "not", "run", "25.9000", "31.9300"]
    metrics = [line.split()[0] for line in div2k[3:] if line[:1] not in (" ", "")]
    assert metrics == ["PSNR↑", "SSIM↑", "LPIPS↓", "DISTS↓", "FID↓", "MUSIQ↑", "CLIPIQA↑"]
    assert any("arXiv 2311.16518" in line for line in div2k)
    free = section(done.stdout, "my-photos")
    assert not any("published:" in line for line in free[:3])
    assert free[1].split() == ["metric", "jaxsr"]
    assert [line.split()[0] for line in free[3:6]] == ["PSNR↑", "SSIM↑", "LPIPS↓"]
    assert free[6].startswith("  (no published")
    assert "no published numbers for seesr" in "\n".join(free)
