"""The model behind the web app: one SeeSR or CoSeR pipeline, loaded once, shared by
every request (the app queues them, one at a time on the devices).

    service = SRService.load("weights/seesr")
    result = service.run("photo.png", {"steps": 2}, seed=0, samples=1)

A request is what `jaxsr sr photo.png --weights DIR --output OUT` does for one file:
the same options (names of SeeSROptions / CoSeROptions), the same output names
(<stem>.png, or <stem>-s0.png ... with several samples) and the same random stream
per output name, so the app's pictures equal the command's. The pipeline keeps one
compiled program per size bucket and option set (its own cache), so a second request
of the same bucket runs without compiling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxsr.app.uploads import check_upload
from jaxsr.data.image_io import save_image
from jaxsr.data.resize import pil_bicubic
from jaxsr.inference import step_progress
from jaxsr.inference.inputs import plan_jobs

DEFAULT_MAX_PIXELS = 1024 * 1024        # input pixels; the output has upscale² times more
MAX_SAMPLES = 16                        # outputs per request: one request must not hold the queue
# Seconds JAX has spent compiling in this process, from its monitoring events (requests
# run one at a time, so the difference over a request is that request's).
_COMPILE_SECONDS = [0.0]
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _count_compile_time(event: str, seconds: float, **_) -> None:
    if event == _COMPILE_EVENT:
        _COMPILE_SECONDS[0] += seconds


@dataclasses.dataclass
class SRResult:
    """One request's outputs. images, files: per sample (uint8 [H, W, 3], PNG paths);
    bicubic: the input enlarged to the outputs' size (the slider's other side);
    prompts: SeeSR's positive prompt per sample (DAPE tags first), None for CoSeR;
    references: CoSeR's generated reference per sample (None in tiled mode or SeeSR);
    compile_seconds: time JAX spent compiling (or loading compiled programs from the
    persistent cache) during the request: 0 when the programs were warm."""

    images: list[np.ndarray]
    files: list[Path]
    bicubic: np.ndarray
    prompts: list[str] | None
    references: list[np.ndarray | None]
    seconds: float
    bucket: tuple
    compile_seconds: float


class SRService:
    """A loaded pipeline and the facts the page needs about it."""

    def __init__(self, pipe, model: str, manifest: dict, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 output_dir=None):
        self.pipe = pipe
        self.model = model
        self.turbo_available = bool(manifest.get("unet_from_sd"))
        self.has_cfw = bool(getattr(pipe, "has_cfw", False))
        self.max_pixels = max_pixels
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="jaxsr-app-"))
        self._lock = threading.Lock()
        self._count = 0
        self._requests = 0

    @classmethod
    def load(cls, weights, *, dtype: str = "auto", attention: str = "auto", devices=None,
             **kwargs) -> SRService:
        """The weights folder's model (as `jaxsr sr` picks it), loaded onto the devices."""
        import jax

        from jaxsr.commands.sr import weights_model
        from jaxsr.convert.cache import read_manifest

        model = weights_model(Path(weights))
        _listen_to_compiles()
        if model == "coser":
            from jaxsr.pipelines.coser import CoSeRPipeline as Pipeline
        else:
            from jaxsr.pipelines.seesr import SeeSRPipeline as Pipeline
        devices = jax.local_devices() if devices is None else devices
        pipe = Pipeline.from_pretrained(weights, dtype=dtype, attention=attention,
                                        devices=devices)
        return cls(pipe, model, read_manifest(weights), **kwargs)

    def next_request(self) -> int:
        """A number for each request the page receives (shown in its status line)."""
        with self._lock:
            self._requests += 1
            return self._requests

    def options(self, settings: dict, *, turbo: bool = False):
        """SeeSROptions / CoSeROptions from {field: value}; None values keep the defaults.
        ValueError on inconsistent values."""
        given = {k: v for k, v in settings.items() if v is not None}
        if self.model == "coser":
            from jaxsr.pipelines.coser import CoSeROptions

            if turbo:
                raise ValueError("turbo is a SeeSR mode")
            return CoSeROptions(**given)
        from jaxsr.pipelines.seesr import SeeSROptions

        if turbo and not self.turbo_available:
            raise ValueError("these weights were not converted for sd-turbo (--unet-from-sd)")
        return SeeSROptions.sd_turbo(**given) if turbo else SeeSROptions(**given)

    def run(self, path, settings: dict, *, seed: int, samples: int = 1, turbo: bool = False,
            progress: Callable[[float, str], None] | None = None,
            on_step: Callable[[int, int, str], None] | None = None) -> SRResult:
        """Super-resolve one uploaded file (see the module doc). UploadError for a bad
        upload, ValueError for bad settings; nothing is computed before both pass.

        progress(fraction, text): per batch. on_step(done, total, label): per denoising
        step, done = 1..total of one sampling loop of one batch, label e.g. "batch 2/3,
        sr step 4/50" (the loops: SeeSR's "denoise", CoSeR's "reference" and "sr").
        With on_step the pipeline runs its programs compiled with step reports
        (jaxsr.inference.step_progress), which give the same pictures."""
        image = check_upload(path, self.max_pixels)
        options = self.options(settings, turbo=turbo)
        if not 1 <= samples <= MAX_SAMPLES:
            raise ValueError(f"sample count must be in 1..{MAX_SAMPLES}, got {samples}")
        report = progress or (lambda fraction, text: None)
        relay = None if on_step is None else _StepRelay(on_step)
        if relay is not None:
            options = dataclasses.replace(options, step_progress=True)
        listening = (contextlib.nullcontext() if relay is None
                     else step_progress.listening(relay))
        with self._lock, listening:
            started = time.monotonic()
            self._count += 1
            folder = self.output_dir / f"request-{self._count:05d}"
            jobs = plan_jobs([Path(path)], folder, samples=samples)
            bucket = self.pipe.bucket_key(image, options)
            compiling_before = _COMPILE_SECONDS[0]
            images, prompts, references = [], [], []
            # Batches as `jaxsr sr` forms them (batch_multiple outputs per call), so
            # that the pictures are the command's to the bit.
            step = self.pipe.batch_multiple
            for start in range(0, len(jobs), step):
                chunk = jobs[start:start + step]
                report(start / len(jobs),
                       f"samples {start + 1}-{start + len(chunk)} of {len(jobs)}")
                if relay is not None:
                    relay.batch, relay.batches = start // step + 1, -(-len(jobs) // step)
                srs, used, refs = self._batch(image, chunk, options, seed, samples)
                images += srs
                prompts += used
                references += refs
            folder.mkdir(parents=True, exist_ok=True)
            for job, sr in zip(jobs, images):
                save_image(job.output, sr)
            height, width = images[0].shape[:2]
            report(1.0, "done")
            return SRResult(images=images, files=[j.output for j in jobs],
                            bicubic=pil_bicubic(image, (width, height)),
                            prompts=None if self.model == "coser" else prompts,
                            references=references, seconds=time.monotonic() - started,
                            bucket=bucket,
                            compile_seconds=_COMPILE_SECONDS[0] - compiling_before)

    def _batch(self, image, chunk, options, seed: int, samples: int):
        """Outputs of `chunk`'s jobs, drawn as `jaxsr sr` draws them (its `_upscale`)."""
        images = [image] * len(chunk)
        if self.model == "coser":
            ids = [job.stream for job in chunk] if samples > 1 else None
            srs, refs = self.pipe.upscale(images, options=options, seed=seed, ids=ids,
                                          batch_size=len(chunk), return_references=True)
            return srs, [None] * len(srs), refs
        srs, used = self.pipe.upscale(images, options=options, seed=seed,
                                      ids=[job.stream for job in chunk],
                                      batch_size=len(chunk), return_prompts=True)
        return srs, used, [None] * len(srs)


class _StepRelay:
    """A request's on_step(done, total, label) fed by the sampling loops' step reports
    (step, total, loop); the label names the batch when the request has several."""

    def __init__(self, on_step: Callable[[int, int, str], None]):
        self.on_step = on_step
        self.batch, self.batches = 1, 1

    def __call__(self, done: int, total: int, loop: str) -> None:
        where = f"batch {self.batch}/{self.batches}, " if self.batches > 1 else ""
        self.on_step(done, total, f"{where}{loop} step {done}/{total}")


_LISTENING = []


def _listen_to_compiles() -> None:
    import jax.monitoring

    if not _LISTENING:
        jax.monitoring.register_event_duration_secs_listener(_count_compile_time)
        _LISTENING.append(True)
