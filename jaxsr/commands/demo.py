"""`jaxsr demo`: the whole SeeSR path on built-in sample data, no downloads.

    jaxsr demo --output demo/

Writes random tiny SeeSR weights (configs/seesr.py "tiny", in the format
`jaxsr convert` writes) to demo/weights, three synthetic low-resolution pictures to
demo/inputs, and runs `jaxsr sr demo/inputs --weights demo/weights --output
demo/outputs`. The weights are random, so the pictures show that every stage runs
(tags, prompts, sampling, colour fix, 4× outputs), not what SeeSR can do; for
that, convert the released weights (see the README).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="run SeeSR end to end on built-in samples (random weights)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("demo"), help="folder (default demo/)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--process-size", type=int, default=128,
                   help="enlarge inputs smaller than this/4 first (default 128; SeeSR's is "
                        "512, slow on a CPU)")
    p.add_argument("--config", default="tiny", choices=["tiny", "base"],
                   help="network sizes: tiny (seconds) or base (the released sizes; slow "
                        "on a CPU)")
    p.set_defaults(run=run)


def run(args) -> int:
    from configs import seesr as seesr_config
    from jaxsr.commands import sr as sr_cmd
    from jaxsr.demo import write_random_seesr, write_sample_images

    weights, inputs = args.output / "weights", args.output / "inputs"
    if not (weights / "manifest.json").is_file():
        write_random_seesr(weights, seesr_config.get_config(args.config))
    write_sample_images(inputs)
    # `jaxsr sr` through its own parser: this module must not import jaxsr.cli, which
    # imports it.
    parser = argparse.ArgumentParser(prog="jaxsr")
    sr_cmd.register(parser.add_subparsers())
    sr_args = parser.parse_args(["sr", str(inputs), "--weights", str(weights), "--output",
                                 str(args.output / "outputs"), "--steps", str(args.steps),
                                 "--process-size", str(args.process_size)])
    return sr_cmd.run(sr_args)
