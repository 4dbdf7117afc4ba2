"""Joining a multi-process JAX run, for every command that can span hosts.

Three ways, checked in this order:
- explicit: `--coordinator HOST:PORT --num-processes N --process-id I` (or the
  environment variables JAXSR_COORDINATOR, JAXSR_NUM_PROCESSES, JAXSR_PROCESS_ID,
  convenient in launch scripts);
- `--distributed`: let `jax.distributed.initialize()` read the cluster from its
  environment (TPU pod slices, SLURM, Open MPI, Kubernetes JobSets);
- neither: a single process.

It must run before anything touches a JAX backend (no device query first).
"""

from __future__ import annotations

import os

_ENV = {"coordinator": "JAXSR_COORDINATOR", "num_processes": "JAXSR_NUM_PROCESSES",
        "process_id": "JAXSR_PROCESS_ID"}


def add_arguments(parser) -> None:
    g = parser.add_argument_group("multi-process (several hosts, or processes on one host)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help=f"address of process 0's coordinator (or ${_ENV['coordinator']})")
    g.add_argument("--num-processes", type=int,
                   help=f"number of processes (or ${_ENV['num_processes']})")
    g.add_argument("--process-id", type=int,
                   help=f"this process's index, 0..N-1 (or ${_ENV['process_id']})")
    g.add_argument("--distributed", action="store_true",
                   help="join the cluster jax.distributed.initialize() detects (TPU pods, "
                        "SLURM, MPI)")


def settings(args) -> dict | None:
    """The explicit coordinator/num_processes/process_id, from flags or environment,
    or None when none is given. Raises ValueError when only some are given."""
    values = {}
    for name, env in _ENV.items():
        value = getattr(args, name, None)
        if value is None and os.environ.get(env):
            value = os.environ[env]
        values[name] = value
    given = [k for k, v in values.items() if v is not None]
    if not given:
        return None
    if len(given) != len(values):
        missing = [f"--{k.replace('_', '-')}" for k in values if values[k] is None]
        raise ValueError(f"multi-process run: {', '.join(missing)} missing (give the "
                         "coordinator, the number of processes and this process's id)")
    n, i = int(values["num_processes"]), int(values["process_id"])
    if not 0 <= i < n:
        raise ValueError(f"--process-id {i} is not in 0..{n - 1}")
    return {"coordinator_address": str(values["coordinator"]), "num_processes": n,
            "process_id": i}


def initialize(args) -> bool:
    """Join the multi-process run the arguments describe; True if one was joined."""
    import jax

    explicit = settings(args)
    if explicit is not None:
        jax.distributed.initialize(**explicit)
        return True
    if getattr(args, "distributed", False):
        jax.distributed.initialize()
        return True
    return False
