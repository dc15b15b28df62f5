"""Checkpoints: one small wrapper around orbax's CheckpointManager.

A checkpoint holds two items: 'state' (the whole train state pytree: parameters, BatchNorm
statistics, optimizer state, weighting state and step) and 'meta' (JSON: the data seed and
steps per epoch, which fix the data position together with the step, and the per-epoch
evaluation history used by the final report). Orbax writes each checkpoint into a temporary
directory and renames it when complete, so a run killed at any moment leaves only whole
checkpoints behind; the newest whole one is restored on restart.

Keeping all orbax calls here means a move to orbax's newer API stays local to this file.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from mtan_jax.errors import DataError


class Checkpointer:
  """Saves and restores (state, meta) pairs under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        # Leftovers of a save that was killed half way are removed on start-up.
        cleanup_tmp_directories=True)
    # Named handlers (rather than item names alone) let the manager read an item's metadata,
    # which `restore_arrays` needs to restore a checkpoint written on other devices.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts an (asynchronous) save of `state` and `meta` at `step`."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores the checkpoint at `step` (default: newest) into the structure of `abstract_state`.

    Args:
      abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) or arrays shaped like
        the state to restore.
      step: which checkpoint; None for the newest.

    Returns:
      (state, meta).
    """
    step = self.latest_step() if step is None else step
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as exc:
      first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
      raise DataError(f'checkpoint {self.directory}/{step} does not match this model/config '
                      f'({first}); use a new --workdir or the config it was trained with') from None
    return restored['state'], restored['meta']

  def restore_arrays(self, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint without a target structure, onto this process's first device.

    The state comes back as nested dicts of arrays (for inspection and tools that do not
    rebuild the model), whatever devices and processes wrote it.
    """
    step = self.latest_step() if step is None else step
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = self._manager.item_metadata(step)['state']
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (keeping shardings) describing `tree`, for `Checkpointer.restore`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)
