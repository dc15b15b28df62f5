"""Preemption: a SIGTERM makes the run finish its step, save a checkpoint and exit.

TPU and cluster schedulers (Kubernetes, Slurm, GCE spot VMs) send SIGTERM some seconds to
minutes before they kill a job. The handler only sets a flag; the training loop looks at it
after every step (a host-side check, no device sync), saves the state of the step it just
finished, waits for the save and raises `Preempted`, which `scripts/train.py` turns into
exit code `config.preemption_exit_code` (default 75, EX_TEMPFAIL: "try again"). The next
start with the same --workdir resumes. The time from the signal to the exit is bounded by
one train step plus one checkpoint write (an evaluation pass, if the signal arrives during
one).

With several processes (TPU pods, multi-node GPU) JAX's distributed runtime already catches
SIGTERM and agrees with every process on one step to stop at (its preemption sync point);
the loop then asks orbax's `CheckpointManager.reached_preemption(step)` instead, so that all
processes save the same step. No Python handler is installed there: it would replace JAX's.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable

import jax

log = logging.getLogger('mtan_jax')

DEFAULT_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL


class Preempted(Exception):
  """The run stopped after a preemption notice, with a checkpoint of `step` on disk."""

  def __init__(self, step: int, directory: str, exit_code: int, seconds: float):
    super().__init__(f'preempted: saved step {step} to {directory} {seconds:.1f} s after the '
                     f'signal; rerun the same command to resume (exit code {exit_code})')
    self.step = step
    self.exit_code = exit_code


class PreemptionWatcher:
  """Watches for a preemption notice; `requested(step)` is checked after every step.

  Args:
    reached_sync_point: multi-process runs: `Checkpointer.reached_preemption`.
  """

  def __init__(self, reached_sync_point: Callable[[int], bool]):
    self._event = threading.Event()
    self._received = 0.0
    self._previous = None
    self._multi = jax.process_count() > 1
    self._reached = reached_sync_point
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    if not self._event.is_set():
      self._received = time.monotonic()
      log.warning('SIGTERM received: finishing this step, saving a checkpoint and exiting')
    self._event.set()

  def requested(self, step: int) -> bool:
    if self._event.is_set():
      return True
    if self._multi and self._reached(step):
      self._received = self._received or time.monotonic()
      self._event.set()
      return True
    return False

  def seconds_since_notice(self) -> float:
    return time.monotonic() - self._received if self._received else 0.0

  def close(self) -> None:
    """Puts the previous SIGTERM handler back."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
