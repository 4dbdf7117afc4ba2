"""Every image-quality metric `jaxsr eval` knows: what it measures, how it is shown,
where its code and weights come from.

Modules are imported only when a metric is used, so a metric whose module is missing
(not built yet in this version) fails with a message, not at import time.

A metric's converted weights live in `<weights dir>/<name>/` (a `jaxsr convert` folder
holding one module named like the metric), so one `--metric-weights DIR` serves all.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

FULL_REFERENCE = "full_reference"
NO_REFERENCE = "no_reference"
SET = "set"                      # one score for a whole folder (FID)


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str                    # as the command line spells it
    display: str                 # table / CSV header
    kind: str                    # FULL_REFERENCE, NO_REFERENCE or SET
    higher_is_better: bool
    order: int                   # column position: the SeeSR / CoSeR papers' table order
    module: str | None           # scoring module; None: not part of this version
    function: str                # scoring function in `module`
    converter: str | None = None     # weights converter module; None: needs no weights
    weight_files: str = ""           # what `jaxsr convert --metric` takes, for messages
    jit: bool = True                 # False: the function runs host code (NIQE's float64
                                     # distance) and jits its device part itself

    @property
    def needs_weights(self) -> bool:
        return self.converter is not None


def _spec(*args, **kw) -> MetricSpec:
    return MetricSpec(*args, **kw)


_LPIPS_FILES = "alexnet-owt-7be5be79.pth alex.pth (or pyiqa's LPIPS_v0.1_alex-df73285e.pth)"
_LPIPS_VGG_FILES = "vgg16-397923af.pth vgg.pth (or pyiqa's LPIPS_v0.1_vgg-a78928a0.pth)"

METRICS: dict[str, MetricSpec] = {s.name: s for s in (
    _spec("psnr", "PSNR", FULL_REFERENCE, True, 0, "jaxsr.metrics.psnr_ssim", "psnr"),
    _spec("ssim", "SSIM", FULL_REFERENCE, True, 1, "jaxsr.metrics.psnr_ssim", "ssim"),
    _spec("lpips", "LPIPS", FULL_REFERENCE, False, 2, "jaxsr.metrics.lpips", "lpips",
          "jaxsr.convert.metric_lpips", _LPIPS_FILES),
    _spec("lpips-vgg", "LPIPS-VGG", FULL_REFERENCE, False, 3, "jaxsr.metrics.lpips", "lpips",
          "jaxsr.convert.metric_lpips", _LPIPS_VGG_FILES),
    _spec("dists", "DISTS", FULL_REFERENCE, False, 4, "jaxsr.metrics.dists", "dists",
          "jaxsr.convert.metric_dists",
          "vgg16-397923af.pth weights.pt (or pyiqa's DISTS_weights-f5e65c96.pth)"),
    _spec("fid", "FID", SET, False, 5, "jaxsr.metrics.fid", "inception_features",
          "jaxsr.convert.metric_fid", "pt_inception-2015-12-05-6726825d.pth"),
    _spec("niqe", "NIQE", NO_REFERENCE, False, 6, "jaxsr.metrics.niqe", "niqe",
          "jaxsr.convert.metric_niqe",
          "niqe_modelparameters.mat (or BasicSR's niqe_pris_params.npz)", jit=False),
    _spec("musiq", "MUSIQ", NO_REFERENCE, True, 7, "jaxsr.metrics.musiq", "musiq",
          "jaxsr.convert.metric_musiq", "musiq_koniq_ckpt-e95806b9.pth"),
    _spec("maniqa", "MANIQA", NO_REFERENCE, True, 8, "jaxsr.metrics.maniqa", "maniqa",
          "jaxsr.convert.metric_maniqa", "ckpt_koniq10k.pt"),
    _spec("clipiqa", "CLIPIQA", NO_REFERENCE, True, 9, "jaxsr.metrics.clipiqa", "clipiqa",
          "jaxsr.convert.metric_clipiqa", "RN50.pt bpe_simple_vocab_16e6.txt.gz"),
)}


class UnknownMetricError(ValueError):
    """A metric name that is not known, or not available in this version."""


class MissingMetricWeightsError(FileNotFoundError):
    """A metric's converted weights are not in the weights folder."""


def _importable(module: str | None) -> bool:
    if module is None:
        return False
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def available() -> list[str]:
    """Names of the metrics this installation can compute, in table order."""
    return [s.name for s in sorted(METRICS.values(), key=lambda s: s.order)
            if _importable(s.module) and (s.converter is None or _importable(s.converter))]


def get(name: str) -> MetricSpec:
    """The spec of an available metric; UnknownMetricError saying what is available."""
    spec = METRICS.get(name)
    if spec is None:
        raise UnknownMetricError(f"unknown metric {name!r}; available: "
                                 f"{', '.join(available())}")
    if name not in available():
        raise UnknownMetricError(f"metric {name!r} is not available in this version; "
                                 f"available: {', '.join(available())}")
    return spec


def parse_names(text: str) -> list[MetricSpec]:
    """'psnr,ssim,lpips' -> their specs in table order (duplicates once)."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise UnknownMetricError(f"no metric named; available: {', '.join(available())}")
    return sorted({get(n) for n in names}, key=lambda s: s.order)


def convert_command(name: str, weights_dir="DIR") -> str:
    files = METRICS[name].weight_files or "FILE [FILE ...]"
    return f"jaxsr convert --metric {name} --from {files} --output {weights_dir}"


def load_metric_weights(weights_dir, name: str) -> tuple[dict, dict]:
    """(config, params) of metric `name` from `weights_dir/name/`."""
    from jaxsr.convert.cache import load_converted

    if weights_dir is None:
        raise MissingMetricWeightsError(
            f"metric {name!r} needs converted weights: pass --metric-weights DIR, after "
            f"`{convert_command(name)}`")
    folder = Path(weights_dir) / name
    if not (folder / "manifest.json").is_file():
        raise MissingMetricWeightsError(
            f"no converted weights for metric {name!r} in {weights_dir} (expected "
            f"{folder}/); convert them with: {convert_command(name, weights_dir)}")
    config, params = load_converted(folder, [name])[name]
    if name.startswith("lpips"):
        want = "vgg" if name == "lpips-vgg" else "alex"
        if config.get("net") != want:
            raise ValueError(f"{folder} holds LPIPS weights for the {config.get('net')!r} "
                             f"network; metric {name!r} needs {want!r}")
    return config, params


def convert_metric(name: str, files: list[Path]) -> tuple[dict, dict]:
    """Run metric `name`'s converter on `files`: (config, params)."""
    spec = get(name)
    if spec.converter is None:
        raise ValueError(f"metric {name!r} needs no weights; nothing to convert")
    config, params = importlib.import_module(spec.converter).convert(list(files))
    if name.startswith("lpips"):
        want = "vgg" if name == "lpips-vgg" else "alex"
        if config.get("net") != want:
            raise ValueError(f"these are LPIPS {config.get('net')!r} weights; metric "
                             f"{name!r} takes {want!r} ones"
                             + (" (use --metric lpips-vgg)" if want == "alex" else ""))
    return config, params


def _as_unit_float(images):
    """uint8 pixels -> float32 [0, 1], the contract's input; floats pass through."""
    import jax.numpy as jnp

    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def scorer(spec: MetricSpec, config: dict | None, params, *, crop_border: int,
           y_channel: bool) -> Callable:
    """A function of uint8 or float batches giving (B,) scores (SET: (B, D) features).

    Full-reference: f(params, sr, hr); no-reference and SET: f(params, images). Params
    are an argument (not closed over) so a jitted f does not embed them as constants.
    """
    fn = getattr(importlib.import_module(spec.module), spec.function)
    name = spec.name
    if name in ("psnr", "ssim"):
        # These read 8-bit values; uint8 batches are passed through unconverted.
        return lambda p, sr, hr: fn(sr, hr, crop_border=crop_border, y_channel=y_channel)
    if name in ("lpips", "lpips-vgg"):
        net = config["net"]
        return lambda p, sr, hr: fn(p, _as_unit_float(sr), _as_unit_float(hr), net=net)
    if name == "dists":
        return lambda p, sr, hr: fn(p, _as_unit_float(sr), _as_unit_float(hr))
    if name == "niqe":
        return lambda p, images: fn(p, _as_unit_float(images), crop_border=crop_border)
    if name == "fid":
        return lambda p, images: fn(p, _as_unit_float(images))
    if name == "musiq":
        return lambda p, images: fn(p, _as_unit_float(images), config=config)
    if name == "clipiqa":
        return lambda p, images: fn(p, _as_unit_float(images))
    if name == "maniqa":
        return lambda p, images: fn(p, _as_unit_float(images), config=config)
    raise UnknownMetricError(f"no scorer for metric {name!r}")


class HeldOutMetrics:
    """Mean scores of a few (SR, HR) pairs, for evaluation during training.

    names: metric names (e.g. ["psnr", "ssim", "lpips"]); fid needs a whole folder and is
    refused. A metric that needs weights is left out, with a note, when `weights_dir` is
    empty, so the default list works before any metric weights are converted; with a
    `weights_dir`, its weights must be there (MissingMetricWeightsError otherwise).
    Call with uint8 (or float [0, 1]) batches (B, H, W, 3): {name: mean over the batch}.
    """

    def __init__(self, names, weights_dir=None, *, crop_border: int = 0,
                 y_channel: bool = False, note=print):
        import jax

        specs = parse_names(",".join(names))
        if any(s.kind == SET for s in specs):
            raise ValueError("fid compares whole folders; it is not a held-out metric "
                             "(run `jaxsr eval` on saved results instead)")
        self.fns, self.params = {}, {}
        for s in specs:
            config = params = None
            if s.needs_weights:
                if not weights_dir:
                    note(f"held-out metric {s.name} left out: it needs converted weights "
                         f"(`{convert_command(s.name)}`, then set the metric weights folder)")
                    continue
                config, params = load_metric_weights(weights_dir, s.name)
            fn = scorer(s, config, params, crop_border=crop_border, y_channel=y_channel)
            self.fns[s.name] = jax.jit(fn) if s.jit else fn
            self.params[s.name] = params
        self.kinds = {s.name: s.kind for s in specs}

    @property
    def names(self) -> list[str]:
        return list(self.fns)

    def __call__(self, sr, hr) -> dict[str, float]:
        import numpy as np

        out = {}
        for name, fn in self.fns.items():
            p = self.params[name]
            scores = fn(p, sr, hr) if self.kinds[name] == FULL_REFERENCE else fn(p, sr)
            out[name] = float(np.mean(np.asarray(scores, np.float64)))
        return out
