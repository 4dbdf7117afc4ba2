"""`jaxsr plan`: compile a jaxsr program for a TPU slice from shapes only, and report
what it needs per chip.

    jaxsr plan --program train --config configs/seesr_train.py:tiny --topology v5e:2x2 \\
        --mesh "[('data', 2), ('fsdp', 2)]" --batch-per-chip 2 --json plan.json
    jaxsr plan --program sample --config configs/seesr.py --topology v5e:1x1 \\
        --batch-per-chip 4 --size 512
    jaxsr plan --program train --config configs/seesr_train.py:tiny --topology attached
    jaxsr plan --program train --config configs/coser_train.py:stage2 --topology v5p:2x2x1 \\
        --mesh "[('data', 2), ('fsdp', 2)]"
    jaxsr plan --program sample --config configs/coser.py --topology v5p:2x2x1 --size 512

No weights are read and nothing is allocated: the program is lowered from abstract
shapes and compiled by the real TPU compiler (libtpu, `pip install 'jaxsr[tpu]'`),
for compile-only devices of the named slice. The report gives per-chip memory
(params, optimizer state, frozen params, batch, temporaries, generated code) against
the chip's HBM, FLOPs (loops at their trip counts), HBM traffic, the collectives of
the compiled HLO, every compiler warning, and a roofline prediction of the step time:
a model, not a measurement.

`--topology attached` compiles for the devices this process has (CPU host devices,
or a GPU) and also runs the program on zeros, to report the measured step time
beside the prediction. Config files are the trainers' for --program train (config.task
picks the step: configs/seesr_train.py, configs/dape_train.py, configs/coser_train.py
stage 1 or 2; every network at the config's sizes, no weights needed) and the model's
for --program sample (configs/seesr.py, or configs/coser.py: CoSeR's reference mode,
reference generation and SR pass, with the plain VAE decoder).
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("plan", help="compile a program for a TPU slice and report memory, "
                                    "FLOPs, collectives and a predicted step time",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--program", required=True, choices=["train", "sample"])
    p.add_argument("--config", required=True, metavar="FILE.py[:VARIANT]",
                   help="a trainer's config (train): configs/seesr_train.py[:tiny], "
                        "configs/dape_train.py[:tiny], configs/coser_train.py:stage1[_tiny] "
                        "or :stage2[_tiny]; configs/seesr.py[:tiny] or configs/coser.py[:tiny] "
                        "(sample); override "
                        "fields with --config.a.b=v")
    p.add_argument("--topology", required=True,
                   help="GENERATION:AxB[xC] (v4, v5e, v5p, v6e; e.g. v5p:4x4x4, v5e:1x1) "
                        "or 'attached'")
    p.add_argument("--num-slices", type=int, default=1,
                   help="slices of --topology joined over the data-centre network")
    p.add_argument("--mesh", default=None,
                   help="mesh axes as a Python list, e.g. \"[('data', -1), ('fsdp', 8)]\" "
                        "(default: the config's mesh, or data only for sampling)")
    p.add_argument("--batch-per-chip", type=int, default=1)
    p.add_argument("--size", type=int, default=None,
                   help="sample: output side in pixels (default 512); train: crop size "
                        "(default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="sample: sampling steps")
    p.add_argument("--repeats", type=int, default=3,
                   help="attached: timed runs of the program")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.set_defaults(run=run, accepts_config_overrides=True)


def parse_mesh(text: str) -> list[tuple[str, int]]:
    try:
        value = ast.literal_eval(text)
        axes = [(str(n), int(s)) for n, s in value]
    except (ValueError, SyntaxError, TypeError) as e:
        raise ValueError(f"--mesh {text!r} is not a list of (name, size) pairs, e.g. "
                         "\"[('data', -1), ('fsdp', 8)]\"") from e
    return axes


def build_plan(args, config=None) -> dict:
    """The report for parsed `args` (also used by benchmarks/tpu_plan.py); `config`
    replaces the file args.config names when given."""
    import jax

    from jaxsr.parallel.mesh import make_mesh
    from jaxsr.plan.coser_sample import coser_sample_program
    from jaxsr.plan.programs import seesr_sample_program, seesr_train_program
    from jaxsr.plan.report import measure, plan_program
    from jaxsr.plan.topology import tpu_topology
    from jaxsr.plan.trainers import coser_train_program, dape_train_program
    from jaxsr.platform import compiling_for
    from jaxsr.train.config_file import load_config

    if config is None:
        config = load_config(args.config, getattr(args, "config_overrides", []))
    attached = args.topology == "attached"
    if attached:
        if args.num_slices != 1:
            raise ValueError("--num-slices needs a TPU --topology, not 'attached'")
        devices, chip, platform = jax.devices(), None, jax.default_backend()
    else:
        devices, chip = tpu_topology(args.topology, args.num_slices)
        platform = "tpu"
    if args.mesh:
        axes = parse_mesh(args.mesh)
    elif args.program == "train":
        axes = [tuple(a) for a in config.mesh]
    else:
        axes = [("data", -1)]
    if args.num_slices > 1 and "dcn" not in [n for n, _ in axes]:
        axes = [("dcn", args.num_slices)] + axes
    mesh = make_mesh(axes, devices)
    with compiling_for(platform):
        if args.program == "train":
            programs = {"seesr": seesr_train_program, "dape": dape_train_program,
                        "coser_stage1": coser_train_program,
                        "coser_stage2": coser_train_program}
            task = config.get("task", "seesr")
            if task not in programs:
                raise ValueError(f"jaxsr plan compiles the train step of config.task "
                                 f"{', '.join(map(repr, programs))}; this config's is "
                                 f"{task!r}")
            if args.size:
                config.data.crop_size = args.size
            program = programs[task](config, mesh, args.batch_per_chip)
        elif config.get("model", "seesr") == "coser":
            program = coser_sample_program(config, mesh, args.batch_per_chip,
                                           args.size or 512, args.steps)
        else:
            program = seesr_sample_program(config, mesh, args.batch_per_chip,
                                           args.size or 512, args.steps)
        topology = args.topology + (f" x {args.num_slices} slices" if args.num_slices > 1
                                    else "")
        kwargs = {}
        if attached:
            from jaxsr.plan.attached import measured_peaks

            dtype = config.model.dtype if args.program == "train" else config.get(
                "dtype", "bfloat16")
            peaks = measured_peaks(dtype)
            kwargs = {"peak_flops": peaks["flops"], "hbm_bandwidth": peaks["bytes"]}
        report, compiled = plan_program(program, mesh, chip, topology, args.batch_per_chip,
                                        **kwargs)
    if attached:
        report["measured"] = measure(compiled, program, args.repeats)
    return report


def run(args) -> int:
    from jaxsr.plan.report import format_report

    report = build_plan(args)
    # The JSON first: a compile can take an hour, and its report must survive a
    # terminal or parent process that is gone by the time the table is printed.
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(format_report(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0
