"""What the command-line scripts share: absl flag parsing and user errors as one line.

`run(main)` runs an absl program (whose `--config` flag, where it has one, is an
ml_collections config file); bad flags, unknown `--config.KEY` overrides, a missing config
file and any `MtanError` raised by `main` are printed as a single `error: ...` line with
exit status 2. A run stopped by a preemption notice (SIGTERM, `mtan_jax.preemption`) prints
one `preempted: ...` line and exits with its configured code (default 75). A `main` that
takes a parameter is given the positional command-line arguments.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags

from mtan_jax.errors import MtanError
from mtan_jax.logs import quiet_libraries
from mtan_jax.preemption import Preempted


def _fail(message: str) -> NoReturn:
  print(f'error: {message}', file=sys.stderr)
  # A failed checkpoint write leaves orbax's write tasks with exceptions that asyncio would
  # log, each with a traceback, when they are collected at exit: the line above said it.
  logging.getLogger('asyncio').setLevel(logging.CRITICAL)
  sys.exit(2)


def parse_flags(argv):
  """absl flag parsing, with bad config overrides reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as exc:
    # A failing config file arrives with its traceback inside the message: keep the flag and
    # the final error line.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    _fail(lines[0] if len(lines) == 1 else f'{lines[0].split(": Error")[0]}: {lines[-1]}')
  except (AttributeError, KeyError) as exc:
    # ml_collections raises these for --config.KEY overrides naming a key the config lacks.
    _fail(f'unknown config key {str(exc).strip(chr(34))} in the --config.* overrides; '
          'README.md lists every key')


def run(main: Callable[[], None] | Callable[[Sequence[str]], None]) -> None:
  """Runs `main` as an absl program with one-line user errors.

  A `main` that takes a parameter is called with the positional arguments left after flag
  parsing (without the program name); one that takes none is called without them, and any
  positional arguments are ignored, as before.
  """
  wants_args = bool(inspect.signature(main).parameters)

  def wrapped(argv):
    quiet_libraries()
    # ml_collections loads the config file lazily and reports a missing one with a traceback.
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      config_path = flags.FLAGS['config'].serialize().split('=', 1)[-1].split(':', 1)[0]
      if not os.path.isfile(config_path):
        _fail(f'config file {config_path} does not exist (e.g. --config configs/mtan.py:runlocal)')
    try:
      if wants_args:
        main(list(argv[1:]))
      else:
        main()
    except MtanError as exc:
      _fail(str(exc))
    except Preempted as exc:
      print(str(exc), file=sys.stderr)
      sys.exit(exc.exit_code)

  app.run(wrapped, flags_parser=parse_flags)
