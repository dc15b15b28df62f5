"""Tests for mtan_jax.workdir: the one-run-per-workdir lock and the writable-workdir check."""

import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import pytest

from mtan_jax import workdir as wd
from mtan_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_one_line(message, path):
  assert '\n' not in message
  assert str(path) in message


def test_acquire_writes_record_and_release_keeps_file(tmp_path):
  workdir = tmp_path / 'new' / 'run'  # Created by acquire.
  lock = wd.WorkdirLock(str(workdir)).acquire()
  try:
    assert lock.locked
    with open(lock.path, encoding='utf-8') as f:
      record = json.load(f)
    assert record['pid'] == os.getpid()
    assert record['host'] == socket.gethostname()
    assert record['argv'] == sys.argv
    assert record['started'][:4].isdigit() and 'T' in record['started']
  finally:
    lock.release()
  assert not lock.locked
  assert os.path.exists(lock.path)
  lock.release()  # A second release is harmless.
  # Released, so it can be taken again, and the context manager form works.
  with wd.WorkdirLock(str(workdir)) as again:
    assert again.locked


def test_second_acquirer_in_same_process_is_refused(tmp_path):
  with wd.WorkdirLock(str(tmp_path)) as first:
    second = wd.WorkdirLock(str(tmp_path))
    with pytest.raises(ConfigError) as e:
      second.acquire()
    message = str(e.value)
    _assert_one_line(message, tmp_path)
    assert 'in use by another training run' in message
    assert f'pid {os.getpid()} on host {socket.gethostname()} since ' in message
    assert first.path in message
    assert '--workdir' in message
    assert not second.locked and second._file is None  # pylint: disable=protected-access
    # The refused acquirer did not wipe the holder's record.
    with open(first.path, encoding='utf-8') as f:
      assert json.load(f)['pid'] == os.getpid()
  # Once the first lets go, the second may take it.
  with wd.WorkdirLock(str(tmp_path)):
    pass


def test_lock_held_by_a_killed_process_is_free_at_once(tmp_path):
  workdir = tmp_path / 'run'
  ready = tmp_path / 'ready'
  code = textwrap.dedent(f"""
      import sys, time
      sys.path.insert(0, {REPO!r})
      from mtan_jax.workdir import WorkdirLock
      lock = WorkdirLock({str(workdir)!r}).acquire()
      open({str(ready)!r}, 'w').close()
      time.sleep(120)
  """)
  child = subprocess.Popen([sys.executable, '-c', code])
  try:
    deadline = time.monotonic() + 60
    while not ready.exists():
      assert child.poll() is None, 'the lock-holding child exited early'
      assert time.monotonic() < deadline, 'the lock-holding child did not get ready'
      time.sleep(0.05)
    with pytest.raises(ConfigError) as e:
      wd.WorkdirLock(str(workdir)).acquire()
    message = str(e.value)
    _assert_one_line(message, workdir)
    assert f'pid {child.pid} on host {socket.gethostname()}' in message

    # A crashed run (SIGKILL: no cleanup code runs) does not leave the workdir stuck.
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    with wd.WorkdirLock(str(workdir)) as lock:
      with open(lock.path, encoding='utf-8') as f:
        assert json.load(f)['pid'] == os.getpid()
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()


def test_file_system_without_flock_runs_unlocked(tmp_path, monkeypatch, caplog):
  def no_locks(fd, op):
    del fd, op
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(fcntl, 'flock', no_locks)
  with caplog.at_level(logging.WARNING, logger='mtan_jax'):
    with wd.WorkdirLock(str(tmp_path)) as lock:
      assert not lock.locked
      with open(lock.path, encoding='utf-8') as f:
        assert json.load(f)['pid'] == os.getpid()
  assert 'does not support file locks' in caplog.text


def test_lock_under_a_regular_file_is_one_line(tmp_path):
  (tmp_path / 'file.txt').write_text('x')
  workdir = tmp_path / 'file.txt' / 'run'
  with pytest.raises(ConfigError) as e:
    wd.WorkdirLock(str(workdir)).acquire()
  _assert_one_line(str(e.value), workdir)
  assert 'not a directory' in str(e.value)


def test_check_writable_ok_leaves_no_probe(tmp_path):
  workdir = tmp_path / 'a' / 'b'
  wd.check_writable(str(workdir), needed_bytes=1024)
  assert workdir.is_dir()
  assert os.listdir(workdir) == []


def test_check_writable_under_a_regular_file(tmp_path):
  # Fails even for root, unlike a chmod'ed directory.
  (tmp_path / 'file.txt').write_text('x')
  workdir = tmp_path / 'file.txt' / 'workdir'
  with pytest.raises(ConfigError) as e:
    wd.check_writable(str(workdir), needed_bytes=0)
  message = str(e.value)
  _assert_one_line(message, workdir)
  assert message.startswith(f'cannot create workdir {workdir}: ')
  assert 'not a directory (ENOTDIR)' in message


def test_check_writable_workdir_is_a_regular_file(tmp_path):
  workdir = tmp_path / 'file.txt'
  workdir.write_text('x')
  with pytest.raises(ConfigError) as e:
    wd.check_writable(str(workdir), needed_bytes=0)
  _assert_one_line(str(e.value), workdir)
  assert 'exists and is not a directory' in str(e.value)


def test_check_writable_read_only_directory(tmp_path):
  if os.geteuid() == 0:
    pytest.skip('running as root, which writes into a chmod 0o500 directory anyway; '
                'test_check_writable_under_a_regular_file and the EROFS test cover this')
  workdir = tmp_path / 'ro'
  workdir.mkdir()
  workdir.chmod(0o500)
  try:
    with pytest.raises(ConfigError) as e:
      wd.check_writable(str(workdir), needed_bytes=0)
    message = str(e.value)
    _assert_one_line(message, workdir)
    assert 'permission denied (EACCES)' in message
  finally:
    workdir.chmod(0o700)


def test_check_writable_probe_write_fails(tmp_path, monkeypatch):
  # A read-only or full file system shows up when the probe is written out; simulate it.
  def fsync_fails(fd):
    del fd
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(os, 'fsync', fsync_fails)
  with pytest.raises(ConfigError) as e:
    wd.check_writable(str(tmp_path), needed_bytes=0)
  message = str(e.value)
  _assert_one_line(message, tmp_path)
  assert 'read-only file system (EROFS)' in message
  assert os.listdir(tmp_path) == []  # The probe was cleaned up.


def test_check_writable_little_free_space(tmp_path, monkeypatch):
  mib = 1024 * 1024
  free = int(12.3 * mib)
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda p: types.SimpleNamespace(total=100 * mib, used=0, free=free))
  with pytest.raises(ConfigError) as e:
    wd.check_writable(str(tmp_path), needed_bytes=40 * mib)
  message = str(e.value)
  _assert_one_line(message, tmp_path)
  assert message == (f'workdir {tmp_path} has 12.3 MiB free but a checkpoint of this run '
                     'needs about 40.0 MiB; free disk space or use another --workdir')

  with pytest.raises(ConfigError) as e:
    wd.check_writable(str(tmp_path), needed_bytes=10 * mib, min_free_bytes=5 * mib)
  _assert_one_line(str(e.value), tmp_path)
  assert 'needs about 10.0 MiB (plus config.min_free_disk_mb=5);' in str(e.value)

  # Exactly enough passes.
  wd.check_writable(str(tmp_path), needed_bytes=free - 2 * mib, min_free_bytes=2 * mib)


def test_describe_os_error():
  assert wd.describe_os_error(OSError(errno.ENOSPC, 'x')) == 'no space left on device (ENOSPC)'
  assert wd.describe_os_error(OSError(errno.EDQUOT, 'x')) == 'disk quota exceeded (EDQUOT)'
  assert wd.describe_os_error(OSError(errno.EFBIG, 'x')).startswith('file too large')
  assert wd.describe_os_error(OSError(errno.EROFS, 'x')) == 'read-only file system (EROFS)'
  assert wd.describe_os_error(PermissionError(errno.EACCES, 'x')) == 'permission denied (EACCES)'
  assert wd.describe_os_error(OSError(errno.EXDEV, 'Invalid\ncross-device link')) == (
      'Invalid cross-device link (EXDEV)')
  assert wd.describe_os_error(OSError('plain message')) == 'plain message'


def test_import_needs_neither_jax_nor_tensorflow():
  code = ('import sys; import mtan_jax.workdir; '
          'bad = [m for m in ("jax", "tensorflow") if m in sys.modules]; '
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)
