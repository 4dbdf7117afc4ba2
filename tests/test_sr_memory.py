"""Full-size SeeSR through `jaxsr sr` in bfloat16 stays within 10 GB of peak RSS when
loaded from a float32 folder (slow: writes a 13 GB release, converts it, runs 2 steps;
~15 minutes and ~22 GB of disk). benchmarks/sr_memory.py measures every model and
dtype the same way."""

import sys

import pytest

from benchmarks.sr_memory import GB, GOALS, held_weight_bytes, prepare, run_measured, write_photo


@pytest.mark.slow
def test_full_size_seesr_bfloat16_peak_rss(tmp_path):
    folder, _ = prepare("seesr", tmp_path, print)
    photo = write_photo(tmp_path / "photo.png")
    run = run_measured([sys.executable, "-m", "jaxsr.cli", "sr", str(photo), "--weights",
                        str(folder), "--output", str(tmp_path / "out"), "--steps", "2",
                        "--dtype", "bfloat16", "--devices", "1", "--compile-cache", ""])
    peak = run["peak_rss_bytes"]
    print(f"\nSeeSR bfloat16: peak RSS {peak / GB:.2f} GB (weights held "
          f"{held_weight_bytes(folder, 'seesr', 'bfloat16') / GB:.2f} GB), {run['wall_s']:.0f} s")
    assert run["returncode"] == 0, run["tail"]
    assert (tmp_path / "out" / "photo.png").is_file()
    assert peak <= GOALS[("seesr", "bfloat16")], peak / GB
