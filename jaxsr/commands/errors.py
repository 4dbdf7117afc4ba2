"""Which exceptions are the user's to fix (printed as one line, exit code 2)."""

from __future__ import annotations


def is_user_error(e: BaseException) -> bool:
    from jaxsr.convert.tree import ConversionError

    user_types: tuple[type, ...] = (ConversionError, FileNotFoundError, FileExistsError,
                                    NotADirectoryError,
                                    IsADirectoryError, PermissionError, ValueError)
    from jaxsr.pipelines.memory import InsufficientMemoryError
    from jaxsr.plan.topology import TopologyUnavailable
    from jaxsr.train.checkpoint import RestoreError

    # A NaN loss and an unusable checkpoint stop training with a message, not a trace;
    # weights that would not fit in memory are refused before loading, with what to try.
    # No libtpu, or a slice it cannot describe: `jaxsr plan` says which.
    user_types += (RestoreError, FloatingPointError, InsufficientMemoryError,
                   TopologyUnavailable)
    try:
        from jaxsr.convert.readers import CheckpointReadError

        user_types += (CheckpointReadError,)
    except ImportError:
        pass
    return isinstance(e, user_types)
