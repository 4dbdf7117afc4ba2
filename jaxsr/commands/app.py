"""`jaxsr app`: a web page for SeeSR or CoSeR on a weights folder (Gradio).

    jaxsr app --weights weights/seesr            # then open http://127.0.0.1:7860
    jaxsr app --weights demo/weights --steps 4   # the random tiny weights of `jaxsr demo`

The page offers the controls of the folder's model (SeeSR or CoSeR, from its
manifest), queues requests and keeps the compiled programs warm across them, one per
size bucket as `jaxsr sr` does; a result equals `jaxsr sr` on the same weights, file
and seed. It listens on 127.0.0.1 unless --host says otherwise and never opens a
public share link. Needs the `app` extra (pip install "jaxsr[app]").

--demo writes the random tiny weights of `jaxsr demo` to the --weights folder first
when it holds none, and offers `jaxsr demo`'s pictures as examples.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(sub) -> None:
    p = sub.add_parser("app", help="serve a SeeSR/CoSeR web app (Gradio) on a weights folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, type=Path,
                   help="weights folder (jaxsr convert's, or jaxsr demo's demo/weights)")
    p.add_argument("--demo", action="store_true",
                   help="write jaxsr demo's random tiny SeeSR weights there when it has none, and "
                        "offer jaxsr demo's pictures as examples")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-pixels", type=_positive_int, default=1024 * 1024,
                   help="largest upload accepted, in input pixels (default 1048576)")
    p.add_argument("--output", type=Path,
                   help="folder for the result PNGs offered for download (default: a new "
                        "temporary folder)")
    d = p.add_argument_group("initial values of the page's controls")
    d.add_argument("--steps", type=_positive_int, help="denoising steps")
    d.add_argument("--process-size", type=_positive_int, help="SeeSR's process size")
    d.add_argument("--seed", type=int, help="seed")
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (see jaxsr sr --help)")
    r.add_argument("--attention", default="auto", choices=("auto", "xla", "dpa", "cudnn"),
                   help="attention kernel (default auto)")
    r.add_argument("--compile-cache", metavar="DIR",
                   help="persistent XLA compilation cache (as jaxsr sr's; '' turns it off)")
    p.set_defaults(run=run)


def run(args) -> int:
    from jaxsr.app import ui
    from jaxsr.app.service import SRService
    from jaxsr.commands.sr import configure_compile_cache

    configure_compile_cache(args.compile_cache)
    examples = []
    if args.demo:
        from configs import seesr as seesr_config
        from jaxsr.demo import write_random_seesr, write_sample_images

        if not (args.weights / "manifest.json").is_file():
            write_random_seesr(args.weights, seesr_config.get_config("tiny"))
    service = SRService.load(args.weights, dtype=args.dtype, attention=args.attention,
                             max_pixels=args.max_pixels, output_dir=args.output)
    if args.demo:
        examples = write_sample_images(service.output_dir / "examples")
    overrides = {"steps": args.steps, "seed": args.seed}
    if service.model == "seesr":
        overrides["process_size"] = args.process_size
    elif args.process_size is not None:
        raise ValueError("--process-size is a SeeSR option")
    page = ui.build(service, overrides, examples=examples)
    print(f"jaxsr app: {service.model} weights from {args.weights}, serving on "
          f"http://{args.host}:{args.port}", flush=True)
    ui.launch(page, host=args.host, port=args.port, allowed_paths=[str(service.output_dir)])
    return 0
