"""Workdir guards run before training: one run per workdir, and a workdir that can be written.

- `WorkdirLock`: an exclusive `fcntl.flock` on `<workdir>/.lock`, so that a second training
  run started on the same workdir stops at once with a one-line error naming the run that
  holds it, instead of both runs interleaving checkpoints and logs.
- `check_writable`: creates the workdir, writes a probe file into it and checks the free
  disk space, so that a read-only, unwritable or nearly full workdir fails before training
  starts rather than at the first checkpoint, hours later.
- `describe_os_error`: readable words for the OS errors a full or read-only disk gives,
  shared with the checkpoint writer.

Errors are `mtan_jax.errors.ConfigError` with one-line messages that name the path. This
module imports neither JAX nor TensorFlow, so the checks run before any device is touched.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from typing import Any

from mtan_jax.errors import ConfigError, one_line

log = logging.getLogger('mtan_jax')

LOCK_FILE = '.lock'

_MIB = 1024 * 1024

# Errors flock gives on file systems without lock support (NFS mounted with `nolock`, some
# FUSE and Lustre mounts). ENOTSUP and EOPNOTSUPP are the same number on Linux, not elsewhere.
_NO_LOCK_SUPPORT = frozenset(
    code for code in (getattr(errno, name, None)
                      for name in ('ENOLCK', 'EOPNOTSUPP', 'ENOTSUP', 'ENOSYS'))
    if code is not None)

_WORDS = {
    'ENOSPC': 'no space left on device',
    'EDQUOT': 'disk quota exceeded',
    'EFBIG': 'file too large for the file system',
    'EROFS': 'read-only file system',
    'EACCES': 'permission denied',
    'EPERM': 'operation not permitted',
    'ENOTDIR': 'a component of the path is not a directory',
    'EEXIST': 'exists and is not a directory',
    'EISDIR': 'is a directory',
    'ENOENT': 'no such file or directory',
    'ENAMETOOLONG': 'file name too long',
    'ELOOP': 'too many levels of symbolic links',
    'EIO': 'input/output error',
    'ENOLCK': 'no locks available',
}
_WORDS_BY_CODE = {getattr(errno, name): (name, words)
                  for name, words in _WORDS.items() if hasattr(errno, name)}


def describe_os_error(exc: OSError) -> str:
  """Readable words for an OS error, e.g. 'no space left on device (ENOSPC)'.

  Args:
    exc: the error, as raised by `open`, `write`, `os.makedirs`, `os.fsync`, ...

  Returns:
    One line: the words for the errors a full, read-only or unwritable disk gives (ENOSPC,
    EDQUOT, EFBIG, EROFS, EACCES, ...) with the errno name, so it can be searched for; for
    other errors the system's own text.
  """
  code = getattr(exc, 'errno', None)
  if code in _WORDS_BY_CODE:
    name, words = _WORDS_BY_CODE[code]
    return f'{words} ({name})'
  if code is not None and getattr(exc, 'strerror', None):
    name = errno.errorcode.get(code)
    return one_line(f'{exc.strerror} ({name})' if name else exc.strerror)
  return one_line(str(exc) or type(exc).__name__)


def _holder_description(text: str) -> str:
  """'pid N on host H since T' from the JSON a lock holder wrote, with '?' for what is missing."""
  try:
    info = json.loads(text)
  except ValueError:
    info = {}
  if not isinstance(info, dict):
    info = {}
  pid, host, started = (info.get(key, '?') for key in ('pid', 'host', 'started'))
  return f'pid {pid} on host {host} since {started}'


class WorkdirLock:
  """One training run per workdir: an exclusive, non-blocking `flock` on `<workdir>/.lock`.

  `acquire()` (or `with WorkdirLock(workdir):`) takes the lock and writes who holds it (pid,
  host, start time, argv) into the lock file as JSON; a second run on the same workdir gets a
  `ConfigError` naming that holder. The lock belongs to the open file, not to the file's
  existence: the kernel drops it when the holding process exits for any reason, SIGKILL and
  out-of-memory kills included, so a crashed run never leaves the workdir stuck and there is
  no stale lock to delete by hand. The file stays in place after `release()`: deleting it
  would race with a new run that has just opened it, leaving two runs with locks on two
  different files.

  Only process 0 of a multi-process run should take the lock; the caller decides. The other
  processes run the same program on other hosts that may share the workdir's file system, so
  they would find the lock held by process 0 and refuse to start.

  On file systems without `flock` support (ENOLCK, EOPNOTSUPP, ...) a warning is logged and
  the run goes on unlocked, rather than refusing to train on such a disk. The lock is
  advisory: it stops other `WorkdirLock`s, not other programs writing into the workdir.
  A child made with `os.fork()` shares the open file and so holds the lock too, until both
  exit; `subprocess` children do not inherit it (Python opens files non-inheritable).
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._file = None
    # False while the lock is not held, or when held "unlocked" on a file system without flock.
    self.locked = False

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock (creating the workdir if needed) and records this run in the lock file.

    Returns:
      self, for `lock = WorkdirLock(workdir).acquire()`.

    Raises:
      ConfigError: another run holds the lock, or the workdir or lock file cannot be
        created or written.
    """
    if self._file is not None:
      return self
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as e:
      raise ConfigError(
          f'cannot create workdir {self.workdir}: {describe_os_error(e)}') from None
    try:
      # No O_TRUNC: the file may be held by another run, whose record we must not wipe
      # before we know the lock is ours.
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise ConfigError(
          f'cannot open lock file {self.path}: {describe_os_error(e)}') from None
    f = os.fdopen(fd, 'r+', encoding='utf-8')
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      self.locked = True
    except BlockingIOError:
      holder = _holder_description(self._read_holder(f))
      f.close()
      raise ConfigError(one_line(
          f'workdir {self.workdir} is in use by another training run ({holder}, lock file '
          f'{self.path}); wait for it to finish, stop it, or use another --workdir')) from None
    except OSError as e:
      if e.errno not in _NO_LOCK_SUPPORT:
        f.close()
        raise ConfigError(
            f'cannot lock {self.path}: {describe_os_error(e)}') from None
      log.warning('The file system of %s does not support file locks (%s); running without '
                  'the one-run-per-workdir lock.', self.workdir, describe_os_error(e))
    try:
      record = {
          'pid': os.getpid(),
          'host': socket.gethostname(),
          'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
          'argv': list(sys.argv),
      }
      f.seek(0)
      f.truncate()
      f.write(json.dumps(record) + '\n')
      f.flush()
    except OSError as e:
      f.close()  # Also drops the lock.
      self.locked = False
      raise ConfigError(
          f'cannot write lock file {self.path}: {describe_os_error(e)}') from None
    self._file = f
    return self

  @staticmethod
  def _read_holder(f) -> str:
    """The holder's record; waits briefly when it has the lock but has not written it yet."""
    # The holder truncates and then writes, so for a moment the file may be empty or partial.
    deadline = time.monotonic() + 0.5
    while True:
      try:
        f.seek(0)
        text = f.read()
      except (OSError, ValueError):
        return ''
      try:
        json.loads(text)
        return text
      except ValueError:
        if time.monotonic() >= deadline:
          return text
      time.sleep(0.05)

  def release(self) -> None:
    """Drops the lock and closes the lock file, which stays in place. Safe to call twice."""
    f, self._file = self._file, None
    if f is None:
      return
    try:
      if self.locked:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except OSError:
      pass  # Closing the file below drops the lock anyway.
    finally:
      self.locked = False
      f.close()

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc_info: Any) -> None:
    self.release()


def check_writable(workdir: str, needed_bytes: int, min_free_bytes: int = 0) -> None:
  """Fails fast, before training, when the workdir cannot hold this run's checkpoints.

  Creates the workdir if needed, writes, fsyncs and deletes a small probe file in it (so a
  read-only file system, missing permissions or a full quota show up now), then requires
  `free >= needed_bytes + min_free_bytes` on its file system.

  Args:
    workdir: the run's workdir.
    needed_bytes: about what one checkpoint of this run takes.
    min_free_bytes: free space to leave on top (config.min_free_disk_mb, in bytes).

  Raises:
    ConfigError: one line naming the path and what is wrong.
  """
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'cannot create workdir {path}: {describe_os_error(e)}') from None
  # Host and pid in the name: processes on other hosts may probe the same shared workdir.
  probe = os.path.join(path, f'.write_probe.{socket.gethostname()}.{os.getpid()}')
  try:
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      os.write(fd, b'\0' * 4096)
      # fsync, because a full disk or quota may only show when the data is written out.
      os.fsync(fd)
    finally:
      os.close(fd)
    os.remove(probe)
  except OSError as e:
    try:
      os.remove(probe)
    except OSError:
      pass
    raise ConfigError(f'cannot write to workdir {path}: {describe_os_error(e)} '
                      f'(probe file {probe})') from None
  try:
    free = shutil.disk_usage(path).free
  except OSError as e:
    raise ConfigError(
        f'cannot read the free disk space of workdir {path}: {describe_os_error(e)}') from None
  if free < needed_bytes + min_free_bytes:
    extra = (f' (plus config.min_free_disk_mb={min_free_bytes / _MIB:g})'
             if min_free_bytes else '')
    raise ConfigError(
        f'workdir {path} has {free / _MIB:.1f} MiB free but a checkpoint of this run needs '
        f'about {needed_bytes / _MIB:.1f} MiB{extra}; free disk space or use another '
        f'--workdir')
