"""`jaxsr eval`'s metrics: images/s of jaxsr's jitted scoring functions against the
references they are tested against, on one batch of real photos, in one run.

    python benchmarks/eval_speed.py [--size 512] [--batch 4] [--repeats 3] \\
        [--metrics psnr,ssim,lpips]

References: psnr/ssim, tests/basicsr_reference.py (BasicSR's functions in float64
numpy; BasicSR itself filters with OpenCV, which is faster than that port's sliding
windows, so its SSIM rate is a lower bound for BasicSR); lpips, the PyTorch LPIPS
module of tests/metric_references.py with the lpips wheel's heads and a random AlexNet
trunk (the speed does not depend on the trunk's values). Both sides score the same
(B, size, size, 3) batch, PSNR/SSIM with crop_border 4 on the Y channel; their timed
runs alternate, so a slow spell of a shared machine falls on both. Prints a table and
writes benchmarks/results/eval_speed_<backend>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    environment,
    print_table,
    summarize,
    time_alternating,
    write_json,
)


def photos(size: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(sr, hr) uint8 (B, size, size, 3): scikit-image photos tiled to size, and their
    x4 bicubic round trips."""
    import skimage.data
    from PIL import Image

    names = ["astronaut", "chelsea", "coffee", "rocket"]
    hr, sr = [], []
    for i in range(batch):
        img = getattr(skimage.data, names[i % len(names)])()[..., :3]
        reps = (-(-size // img.shape[0]), -(-size // img.shape[1]), 1)
        img = np.ascontiguousarray(np.tile(img, reps)[:size, :size])
        small = Image.fromarray(img).resize((size // 4, size // 4), Image.BICUBIC)
        hr.append(img)
        sr.append(np.asarray(small.resize((size, size), Image.BICUBIC)))
    return np.stack(sr), np.stack(hr)


def lpips_pair(tmp: Path):
    """(jaxsr params, PyTorch reference) holding the same random AlexNet trunk."""
    import torch

    from jaxsr.convert.metric_lpips import convert
    from tests import metric_references as R

    ref = R.LPIPSReference("alex")
    R.randomize_trunk(ref.features, 0)
    trunk = tmp / "alexnet-owt-7be5be79.pth"
    torch.save({k: v.contiguous() for k, v in R.torchvision_file_state(ref.features, 0).items()},
               trunk)
    head = R.lpips_head_file("alex")
    ref.load_state_dict(torch.load(head, map_location="cpu", weights_only=True), strict=False)
    _, params = convert([trunk, head])
    return params, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--metrics", default="psnr,ssim,lpips")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/eval_speed_<backend>.json)")
    args = ap.parse_args()
    env = environment()
    import jax
    import torch

    from jaxsr.metrics.lpips import lpips
    from jaxsr.metrics.psnr_ssim import psnr, ssim
    from tests import basicsr_reference as B

    sr, hr = photos(args.size, args.batch)
    sr_d, hr_d = jax.device_put(sr), jax.device_put(hr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.metrics.split(","):
            if name in ("psnr", "ssim"):
                fn = psnr if name == "psnr" else ssim
                ref_fn = B.calculate_psnr if name == "psnr" else B.calculate_ssim

                def ours(fn=fn):
                    return fn(sr_d, hr_d, crop_border=4, y_channel=True).block_until_ready()

                def theirs(ref_fn=ref_fn):
                    return [ref_fn(s[..., ::-1], h[..., ::-1], 4, test_y_channel=True)
                            for s, h in zip(sr, hr)]
                reference = "BasicSR port (numpy float64)"
            elif name == "lpips":
                params, ref = lpips_pair(Path(tmp))
                params = jax.device_put(params)
                jitted = jax.jit(lambda p, a, b: lpips(p, a.astype("float32") / 255.0,
                                                       b.astype("float32") / 255.0, net="alex"))
                sr_t = torch.from_numpy(sr).permute(0, 3, 1, 2).float() / 255.0
                hr_t = torch.from_numpy(hr).permute(0, 3, 1, 2).float() / 255.0

                def ours(jitted=jitted, params=params):
                    return jitted(params, sr_d, hr_d).block_until_ready()

                def theirs(ref=ref, sr_t=sr_t, hr_t=hr_t):
                    with torch.no_grad():
                        return ref(sr_t, hr_t)
                reference = "LPIPS in PyTorch (float32)"
            else:
                raise SystemExit(f"no benchmark for metric {name!r} (psnr, ssim, lpips)")
            start = time.perf_counter()
            ours()
            compile_s = time.perf_counter() - start
            times = time_alternating({"jaxsr": ours, "reference": theirs}, warmup=1,
                                     repeats=args.repeats)
            j, r = summarize(times["jaxsr"]), summarize(times["reference"])
            rows.append({"metric": name, "reference": reference,
                         "jaxsr_images_s": args.batch / j["median_s"],
                         "reference_images_s": args.batch / r["median_s"],
                         "speedup": r["median_s"] / j["median_s"],
                         "jaxsr_first_call_s": compile_s, "jaxsr": j, "reference_times": r})
    print(f"{args.batch} images of {args.size}x{args.size} on {jax.devices()[0].device_kind}")
    print_table(rows, ["metric", "jaxsr_images_s", "reference_images_s", "speedup",
                       "jaxsr_first_call_s", "reference"])
    out = args.out or f"benchmarks/results/eval_speed_{jax.default_backend()}.json"
    write_json(out, {"benchmark": "eval_speed", "size": args.size, "batch": args.batch,
                     "repeats": args.repeats, "rows": rows, "environment": env})


if __name__ == "__main__":
    main()
