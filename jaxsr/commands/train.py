"""`jaxsr train`: train a model from a config file, resumably, on one or many hosts.

    jaxsr train --config configs/seesr_train.py:tiny --workdir runs/tiny \\
        --config.data.source=folder:/data/images --config.total_steps=1000
    jaxsr train --config configs/dape_train.py --workdir runs/dape \\
        --config.init.ram=ram_swin_large_14m.pth --config.data.source=coco

config.task picks the trainer: "seesr" (the default), "dape", "coser_stage1" or
"coser_stage2" (configs/coser_train.py).

The workdir holds checkpoints/ (orbax), metrics.jsonl, tensorboard/ and config.json.
Run the same command again to resume from the newest checkpoint. SIGTERM saves a
checkpoint at the end of the current step and exits with status 143; a non-finite
loss stops the run (exit 2) without saving past the last good checkpoint.
Multi-host: add --coordinator/--num-processes/--process-id (or --distributed) on every
host, or use the scripts in launch/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxsr.parallel import distributed


def register(sub) -> None:
    p = sub.add_parser("train", help="train from a config file (resumable, multi-host)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE.py[:VARIANT]",
                   help="a config file with get_config(variant), e.g. "
                        "configs/seesr_train.py:tiny; override fields with --config.a.b=v")
    p.add_argument("--workdir", required=True, type=Path,
                   help="checkpoints and logs; an existing one is resumed")
    distributed.add_arguments(p)
    p.set_defaults(run=run, accepts_config_overrides=True)


def run(args) -> int:
    from jaxsr.train.config_file import load_config

    config = load_config(args.config, getattr(args, "config_overrides", []))
    distributed.initialize(args)            # before any JAX backend starts
    import jax

    trainers = {"seesr": "jaxsr.train.seesr_trainer", "dape": "jaxsr.train.dape_trainer",
                "coser_stage1": "jaxsr.train.coser_trainer",
                "coser_stage2": "jaxsr.train.coser_trainer"}
    task = config.get("task", "seesr")
    if task not in trainers:
        raise ValueError(f"config.task {task!r} is not one of {sorted(trainers)}")
    import importlib

    train = importlib.import_module(trainers[task]).train

    if jax.process_index() == 0:
        args.workdir.mkdir(parents=True, exist_ok=True)
        (args.workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    status = train(config, args.workdir).status
    if status == 0 and jax.process_index() == 0:
        print(json.dumps({"finished": True, "steps": config.total_steps,
                          "workdir": str(args.workdir)}), flush=True)
    return status
