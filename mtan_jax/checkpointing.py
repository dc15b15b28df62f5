"""Checkpoints: one small wrapper around orbax's CheckpointManager.

A checkpoint holds two items: 'state' (the whole train state pytree: parameters, BatchNorm
statistics, optimizer state, weighting state and step) and 'meta' (JSON: the data seed and
steps per epoch, which fix the data position together with the step, and the per-epoch
evaluation history used by the final report). Orbax writes each checkpoint into a temporary
directory and renames it when complete, so a run killed at any moment leaves only whole
checkpoints behind; the newest whole one is restored on restart. A newest checkpoint that
still cannot be read (a damaged disk, files removed by hand) is reported, moved aside to
`checkpoints/unreadable_<step>_<time>` and the one before it is used (`restore_newest_readable`).
A save that fails (disk full, unwritable directory) raises `CheckpointError` in one line;
orbax never renames the partial directory, so it is never taken for a checkpoint.

Keeping all orbax calls here means a move to orbax's newer API stays local to this file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtan_jax.errors import DataError, MtanError, one_line
from mtan_jax.workdir import describe_os_error

log = logging.getLogger('mtan_jax')


class CheckpointError(MtanError):
  """A checkpoint could not be written (disk full, unwritable directory...)."""


def _write_failure(exc: BaseException) -> str:
  """The OS error behind a failed write, in words (orbax wraps TensorStore's errors, which
  carry the errno as text: `... Failed writing: "<file>": ... [os_error_code='28']`)."""
  cause = exc
  while cause is not None and not isinstance(cause, OSError):
    cause = cause.__cause__ or cause.__context__
  if cause is not None:
    return describe_os_error(cause)
  text = str(exc)
  code = re.search(r"os_error_code='(\d+)'", text)
  if code is None:
    return _first_line(exc)
  where = re.search(r'Failed writing: "([^"]+)"', text)
  return describe_os_error(OSError(int(code.group(1)), os.strerror(int(code.group(1))))) + (
      f' writing {where.group(1)}' if where else '')


def _first_line(exc: BaseException) -> str:
  text = str(exc).strip()
  return one_line(text.splitlines()[0]) if text else type(exc).__name__


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
    """Starts an (asynchronous) save of `state` and `meta` at `step`.

    A failure of this or of the previous asynchronous save raises `CheckpointError`.
    """
    with self._write_errors(step):
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=True)

  @contextlib.contextmanager
  def _write_errors(self, step: int | None):
    """A failed write becomes one line naming the directory and the OS error."""
    try:
      yield
    except MtanError:
      raise
    except Exception as exc:  # pylint: disable=broad-except
      raise CheckpointError(f'could not write a checkpoint to {self.directory} (at step {step}): '
                            f'{_write_failure(exc)}; free disk space or fix the directory, then '
                            f'rerun to resume from the last complete checkpoint') from None

  def reached_preemption(self, step: int) -> bool:
    """Whether the multi-process preemption sync point is `step` (orbax/JAX's preemption
    service: all processes agree on the step at which to save after a SIGTERM)."""
    return self._manager.reached_preemption(step)

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
      raise DataError(f'checkpoint {self.directory}/{step} does not match this model/config '
                      f'({_first_line(exc)}); use a new --workdir or the config it was trained with') from None
    return restored['state'], restored['meta']

  def restore_meta(self, step: int) -> dict[str, Any]:
    """The JSON item ('meta': data position, evaluation history) of the checkpoint at `step`,
    without reading its arrays."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore_newest_readable(self, abstract_state: Any) -> tuple[Any, dict[str, Any], list[str]]:
    """Restores the newest checkpoint that can be read, newest first.

    A checkpoint that fails to load is moved aside to `unreadable_<step>_<time>` (so that
    the run can save that step again) and the next older one is tried. A checkpoint of
    another model (its metadata's array shapes differ) is not damage: its error is raised
    at once. If none loads, `DataError` names the newest one's failure.

    Returns:
      (state, meta, warnings): one line per checkpoint skipped.
    """
    warnings: list[str] = []
    first_error: Exception | None = None
    for step in sorted(self._manager.all_steps(), reverse=True):
      error: Exception | None = None
      try:
        state, meta = self.restore(abstract_state, step)
      except Exception as exc:  # pylint: disable=broad-except
        if self._other_model(step, abstract_state):
          raise  # another model or config: the older checkpoints are no different
        # Anything else (truncated, missing or garbled files) is this checkpoint's damage;
        # the one before may still be whole.
        error = exc
      ok = error is None
      if jax.process_count() > 1:
        # Every process must resume from the same step.
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        ok = bool(np.all(multihost_utils.process_allgather(np.array(ok))))
        error = error or DataError(f'checkpoint step {step} could not be read on another process')
      if ok:
        return state, meta, warnings
      first_error = first_error or error
      moved = self._move_aside(step)
      warnings.append(f'checkpoint step {step} in {self.directory} is unreadable ({_first_line(error)}); '
                      f'moved it to {moved}, trying the one before')
      log.warning(warnings[-1])
    if first_error is None:
      raise DataError(f'no checkpoint in {self.directory}')
    raise DataError(f'no readable checkpoint in {self.directory} (newest: {_first_line(first_error)}); '
                    f'use a new --workdir to start over') from None

  def _other_model(self, step: int, abstract_state: Any) -> bool:
    """Whether the checkpoint's own metadata describes arrays of other shapes than the
    state's (a checkpoint of another model), as opposed to damaged files."""
    try:
      metadata = self._manager.item_metadata(step)['state']
      saved = sorted(tuple(m.shape) for m in jax.tree.leaves(metadata))
    except Exception:  # pylint: disable=broad-except
      return False  # the metadata itself is damaged
    return saved != sorted(tuple(x.shape) for x in jax.tree.leaves(abstract_state))

  def _move_aside(self, step: int) -> str:
    """Renames a step's directory out of orbax's view (process 0); returns the new path."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory, f'unreadable_{step}_{int(time.time())}')
    if jax.process_index() == 0 and os.path.exists(source):
      os.replace(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'mtan_jax_move_aside_{step}')
    self._manager.reload()
    return target

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
    """Blocks until pending asynchronous saves are on disk (`CheckpointError` if one failed)."""
    with self._write_errors(self._manager.latest_step()):
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (keeping shardings) describing `tree`, for `Checkpointer.restore`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)
