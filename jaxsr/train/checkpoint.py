"""Training checkpoints with orbax: state, data-iterator position and config, together.

    ckpt = Checkpoints(workdir / "checkpoints", keep=3)
    ckpt.save(step, state, data_state, config_dict)   # async; the next save waits
    step, state, data_state = ckpt.restore_latest(abstract_state)   # or None

Each step is one orbax directory with three items: `state` (the sharded TrainState,
written by every process in parallel; restored straight into the target shardings),
`data` (the input iterator's state, JSON) and `config` (JSON). Every process has
read the same number of batches from its own shard, so their iterator states are
equal (grain's counts positions, not files); `save` checks that and process 0's
copy serves them all. orbax
writes to a temporary name and renames when complete, so a run killed during a save
keeps its previous checkpoint; `restore_latest` takes the newest complete one.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import jax
import orbax.checkpoint as ocp


def _check_same_everywhere(step: int, data_state) -> None:
    """Every process's iterator state must be equal (through the coordination
    service's key-value store: no device collective beside running programs)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    digest = str(zlib.crc32(json.dumps(data_state, sort_keys=True).encode()))
    client.key_value_set(f"jaxsr/data_state/{step}/{jax.process_index()}", digest,
                         allow_overwrite=True)
    client.wait_at_barrier(f"jaxsr/data_state/{step}", 3_600_000)
    digests = {v for _, v in client.key_value_dir_get(f"jaxsr/data_state/{step}/")}
    if len(digests) != 1:
        raise RuntimeError("the processes' data-iterator states differ; a checkpoint "
                           "could not resume them all")


class RestoreError(RuntimeError):
    """A checkpoint exists but does not fit this run (changed model or config)."""


class Checkpoints:
    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "config", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state, config: dict) -> None:
        _check_same_everywhere(step, data_state)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
            data=ocp.args.JsonSave(data_state)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state):
        """(step, state, data_state) of the newest checkpoint, or None when there is none.

        abstract_state: the TrainState as ShapeDtypeStructs carrying their shardings.
        Raises RestoreError naming the directory when the checkpoint does not fit.
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - re-raised with the checkpoint's name
            raise RestoreError(f"cannot restore {self.directory / str(step)}: {e}. If the "
                               "model or optimizer changed, start a new workdir.") from e
        return step, got["state"], got["data"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
