"""`jaxsr eval`'s metrics: images/s of jaxsr's jitted scoring functions against the
references they are tested against, on one batch of real photos, in one run.

    python benchmarks/eval_speed.py [--size 256] [--batch 4] [--repeats 3] \\
        [--maniqa-crops 1] [--torch-threads N] [--metrics psnr,ssim,lpips,...]

Default: every metric (psnr, ssim, lpips, lpips-vgg, dists, fid, niqe, musiq, maniqa,
clipiqa); the defaults take about 7 minutes on a shared 2-core CPU.

jaxsr's side is what `jaxsr eval` runs: `jaxsr.metrics.registry.scorer`, jitted unless
the metric runs host code itself (NIQE jits its features and finishes in float64
numpy), on uint8 batches already on the device. Its first call (compile plus one run)
is reported apart from the timed runs. The references, on the same batch in float32 NCHW [0, 1]:
  psnr/ssim   tests/basicsr_reference.py: BasicSR's functions in float64 numpy; BasicSR
              itself filters with OpenCV, which is faster than that port's sliding
              windows, so its SSIM rate is a lower bound for BasicSR
  lpips       tests/metric_references.py: LPIPS v0.1 in PyTorch, the lpips wheel's heads
  lpips-vgg   and a random AlexNet / VGG16 trunk
  dists       tests/metric_references.py: DISTS in PyTorch, DISTS_pytorch's alpha/beta
  fid         tests/fid_reference.py: pytorch-fid's pool3 features, the bilinear resize to
              299 included. The Frechet distance of a whole set (a one-off 2048x2048
              matrix square root, not per-image work) is left out on both sides
  niqe        pyiqa's own `calculate_niqe` (float64 numpy/torch), tests/niqe_reference.py,
              with BasicSR's pristine model
  musiq       tests/musiq_reference.py: pyiqa's MUSIQ at its release sizes, the
              multi-scale preprocessing (resizes to 224 and 384, patches, hashed
              positions) on both sides
  maniqa      tests/maniqa_reference.py: pyiqa's MANIQA (ViT-B/8 trunk) at the release
              sizes on `--maniqa-crops` 224x224 crops per image on both sides. pyiqa
              scores 20; one crop costs about 150 GFLOP, so 20 crops of a batch would
              take many minutes on a small CPU; each crop is one trunk pass
  clipiqa     tests/clipiqa_reference.py: OpenAI CLIP RN50 with pyiqa's CLIPIQA head,
              as pyiqa's forward runs it (the ten prompts through the text tower on
              every call; jaxsr computes them once, at conversion)
Every network has random weights of the release shapes (no download; the speed does not
depend on the values). `max_diff_rel` is the largest difference of the two sides' scores
(FID: features) over the largest reference value: they compute the same thing. PSNR,
SSIM and NIQE use crop_border 4, PSNR/SSIM on the Y channel.

XLA runs with jaxsr's default flags (`jaxsr.platform`), as the command line sets them.
Timed runs alternate (`time_alternating`), so a slow spell of a shared machine falls on
both sides. PyTorch keeps its default thread count (one per core) unless
`--torch-threads` says otherwise; the count is recorded in the JSON's environment. XLA's
CPU backend also uses every core. On an oversubscribed CPU, PyTorch's OpenMP threads
wait at every op's barrier for a descheduled partner, so small ops can cost
milliseconds each: compare with `--torch-threads 1` there. Prints a table and writes
benchmarks/results/eval_speed_<backend>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
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

CROP_BORDER = 4


@dataclasses.dataclass
class Inputs:
    """One batch in both frameworks' layouts, and what the builders need beside it."""

    sr: np.ndarray          # (B, H, W, 3) uint8
    hr: np.ndarray
    sr_t: object            # (B, 3, H, W) float32 torch tensors in [0, 1]
    hr_t: object
    tmp: Path               # for the checkpoint files the converters read
    maniqa_crops: int


@dataclasses.dataclass
class Pair:
    """jaxsr's converted weights for `registry.scorer`, and the reference's scoring call."""

    config: dict | None
    params: object
    theirs: Callable[[], object]
    reference: str


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


def _no_grad(fn: Callable) -> Callable[[], object]:
    import torch

    def call():
        with torch.no_grad():
            return fn()
    return call


def _saved(state: dict, path: Path) -> Path:
    import torch

    torch.save({k: v.contiguous() for k, v in state.items()}, path)
    return path


def _psnr_ssim(name: str) -> Callable[[Inputs], Pair]:
    def build(x: Inputs) -> Pair:
        from tests import basicsr_reference as B

        ref_fn = B.calculate_psnr if name == "psnr" else B.calculate_ssim

        def theirs():   # BasicSR reads BGR
            return [ref_fn(s[..., ::-1], h[..., ::-1], CROP_BORDER, test_y_channel=True)
                    for s, h in zip(x.sr, x.hr)]
        return Pair(None, None, theirs, "BasicSR port (numpy float64)")
    return build


def _lpips(net: str) -> Callable[[Inputs], Pair]:
    def build(x: Inputs) -> Pair:
        import torch

        from jaxsr.convert.metric_lpips import convert
        from tests import metric_references as R

        ref = R.LPIPSReference(net)
        R.randomize_trunk(ref.features, 0)
        name = "alexnet-owt-7be5be79.pth" if net == "alex" else "vgg16-397923af.pth"
        trunk = _saved(R.torchvision_file_state(ref.features, 0), x.tmp / name)
        head = R.lpips_head_file(net)
        ref.load_state_dict(torch.load(head, map_location="cpu", weights_only=True),
                            strict=False)
        config, params = convert([trunk, head])
        return Pair(config, params, _no_grad(lambda: ref(x.sr_t, x.hr_t)),
                    f"LPIPS-{net} in PyTorch (float32)")
    return build


def _dists(x: Inputs) -> Pair:
    import torch

    from jaxsr.convert.metric_dists import convert
    from tests import metric_references as R

    ref = R.DISTSReference()
    R.randomize_trunk(ref.features, 0)
    weights = R.dists_weights_file()
    w = torch.load(weights, map_location="cpu", weights_only=True)
    with torch.no_grad():
        ref.alpha.copy_(w["alpha"])
        ref.beta.copy_(w["beta"])
    trunk = _saved(R.torchvision_file_state(ref.features, 0), x.tmp / "vgg16-397923af.pth")
    config, params = convert([trunk, weights])
    return Pair(config, params, _no_grad(lambda: ref(x.sr_t, x.hr_t)),
                "DISTS in PyTorch (float32)")


def _fid(x: Inputs) -> Pair:
    from jaxsr.convert.metric_fid import convert
    from tests import fid_reference

    model = fid_reference.FIDInception().eval()
    path = _saved(model.state_dict(), x.tmp / "pt_inception-2015-12-05-6726825d.pth")
    config, params = convert([path])
    return Pair(config, params,
                _no_grad(lambda: fid_reference.pool3_features(model, x.sr_t)),
                "pytorch-fid pool3 features in PyTorch (float32)")


def _niqe(x: Inputs) -> Pair:
    import importlib.util

    import torch

    from jaxsr.convert.metric_niqe import convert
    from tests.niqe_reference import pyiqa_calculate_niqe

    def package_dir(name):
        return Path(importlib.util.find_spec(name).submodule_search_locations[0])

    calculate_niqe = pyiqa_calculate_niqe(package_dir("pyiqa"))
    config, params = convert([package_dir("basicsr") / "metrics" / "niqe_pris_params.npz"])
    mu = torch.from_numpy(params["mu_pris_param"])
    cov = torch.from_numpy(params["cov_pris_param"])
    return Pair(config, params,
                lambda: calculate_niqe(x.sr_t, crop_border=CROP_BORDER, test_y_channel=True,
                                       color_space="yiq", mu_pris_param=mu,
                                       cov_pris_param=cov),
                "pyiqa calculate_niqe (float64)")


def _musiq(x: Inputs) -> Pair:
    from jaxsr.convert.metric_musiq import convert
    from tests.musiq_reference import MUSIQ

    model = MUSIQ().eval()
    config, params = convert([_saved(model.state_dict(),
                                     x.tmp / "musiq_koniq_ckpt-e95806b9.pth")])
    return Pair(config, params, _no_grad(lambda: model(x.sr_t)),
                "pyiqa MUSIQ in PyTorch (float32)")


def _maniqa(x: Inputs) -> Pair:
    from jaxsr.convert.metric_maniqa import convert
    from tests.maniqa_reference import MANIQA

    model = MANIQA(test_sample=x.maniqa_crops).eval()
    path = _saved(model.state_dict(), x.tmp / "ckpt_koniq10k.pt")
    config, params = convert([path], test_sample=x.maniqa_crops)
    path.unlink()       # ~440 MB
    return Pair(config, params, _no_grad(lambda: model(x.sr_t)),
                f"pyiqa MANIQA in PyTorch (float32), crops: {x.maniqa_crops}")


def _clipiqa(x: Inputs) -> Pair:
    import torch

    from jaxsr.convert import metric_clipiqa
    from tests import clipiqa_reference as R

    model = R.build(R.RN50, 0)
    state = {k: v.numpy() for k, v in R.released_state(model).items()}
    tokenizer = metric_clipiqa.load_clip_tokenizer([R.bpe_file()])
    config, params = metric_clipiqa.convert_state(state, tokenizer)
    ids = R.openai_tokenizer()(R.PROMPTS)
    mean = torch.tensor(R.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(R.CLIP_STD).view(1, 3, 1, 1)

    def theirs():   # pyiqa CLIPIQA.forward: image and prompts through CLIP, pair softmax
        logits = model((x.sr_t - mean) / std, ids)
        return logits.reshape(logits.shape[0], -1, 2).softmax(dim=-1)[..., 0].mean(dim=1)
    return Pair(config, params, _no_grad(theirs), "pyiqa CLIPIQA (CLIP RN50) in PyTorch")


BUILDERS: dict[str, Callable[[Inputs], Pair]] = {
    "psnr": _psnr_ssim("psnr"), "ssim": _psnr_ssim("ssim"), "lpips": _lpips("alex"),
    "lpips-vgg": _lpips("vgg"), "dists": _dists, "fid": _fid, "niqe": _niqe,
    "musiq": _musiq, "maniqa": _maniqa, "clipiqa": _clipiqa}


def ours_call(name: str, pair: Pair, sr_d, hr_d) -> Callable[[], object]:
    """jaxsr eval's scoring call for metric `name`, blocking until its scores are ready."""
    import jax

    from jaxsr.metrics import registry

    spec = registry.get(name)
    fn = registry.scorer(spec, pair.config, pair.params, crop_border=CROP_BORDER,
                         y_channel=True)
    fn = jax.jit(fn) if spec.jit else fn
    params = jax.device_put(pair.params)
    args = (sr_d, hr_d) if spec.kind == registry.FULL_REFERENCE else (sr_d,)
    return lambda: jax.block_until_ready(fn(params, *args))


def first_call(fn: Callable) -> tuple[float, np.ndarray]:
    """(seconds, the result flattened to float64 numpy)."""
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    if hasattr(out, "detach"):
        out = out.detach().numpy()
    return seconds, np.asarray(out, np.float64).reshape(-1)


def bench(name: str, x: Inputs, sr_d, hr_d, batch: int, repeats: int) -> dict:
    pair = BUILDERS[name](x)
    ours = ours_call(name, pair, sr_d, hr_d)
    # The first calls (jaxsr's compile, torch's allocations) are the warm-up.
    ours_first, got = first_call(ours)
    theirs_first, want = first_call(pair.theirs)
    # Both sides must compute the same thing for the rates to compare; relative to the
    # largest reference value, as random networks can score near zero (and absolute
    # when every reference score is 0, as a random MANIQA's can be).
    gap, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
    diff = gap / scale if scale > 0 else gap
    times = time_alternating({"jaxsr": ours, "reference": pair.theirs}, warmup=0,
                             repeats=repeats)
    j, r = summarize(times["jaxsr"]), summarize(times["reference"])
    return {"metric": name, "reference": pair.reference,
            "jaxsr_images_s": batch / j["median_s"],
            "reference_images_s": batch / r["median_s"],
            "speedup": r["median_s"] / j["median_s"],
            "jaxsr_first_call_s": ours_first, "reference_first_call_s": theirs_first,
            "max_diff_rel": diff,
            "jaxsr": j, "reference_times": r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--maniqa-crops", type=int, default=1,
                    help="224x224 crops per image for MANIQA, both sides (pyiqa: 20)")
    ap.add_argument("--metrics", default=",".join(BUILDERS))
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads for the references (default: torch's own)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/eval_speed_<backend>.json)")
    args = ap.parse_args()
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise SystemExit(f"no benchmark for metric(s) {unknown}; known: {', '.join(BUILDERS)}")
    from jaxsr.platform import configure_xla_defaults

    configure_xla_defaults()        # XLA's settings as `jaxsr eval` runs with them
    env = environment()
    import jax
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    env["torch_threads"] = torch.get_num_threads()
    sr, hr = photos(args.size, args.batch)
    sr_d, hr_d = jax.device_put(sr), jax.device_put(hr)
    to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float().contiguous() / 255.0
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        x = Inputs(sr, hr, to_torch(sr), to_torch(hr), Path(tmp), args.maniqa_crops)
        for name in names:
            rows.append(bench(name, x, sr_d, hr_d, args.batch, args.repeats))
            print(f"{name}: {rows[-1]['jaxsr_images_s']:.3f} vs "
                  f"{rows[-1]['reference_images_s']:.3f} images/s", flush=True)
    total_s = time.perf_counter() - start
    print(f"{args.batch} images of {args.size}x{args.size} on {jax.devices()[0].device_kind}, "
          f"torch threads {torch.get_num_threads()}, {total_s:.0f} s in all")
    shown = [{**r, "max_diff_rel": f"{r['max_diff_rel']:.1e}"} for r in rows]
    print_table(shown, ["metric", "jaxsr_images_s", "reference_images_s", "speedup",
                        "jaxsr_first_call_s", "max_diff_rel", "reference"])
    out = args.out or f"benchmarks/results/eval_speed_{jax.default_backend()}.json"
    write_json(out, {"benchmark": "eval_speed", "size": args.size, "batch": args.batch,
                     "repeats": args.repeats, "maniqa_crops": args.maniqa_crops,
                     "crop_border": CROP_BORDER, "total_s": total_s, "rows": rows,
                     "environment": env})


if __name__ == "__main__":
    main()
