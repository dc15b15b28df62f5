"""User-facing error types.

Every problem a user can cause (bad config, bad data, a diverging run) is raised as one of
these with a one-line message naming the file, key or value and what was expected.
`scripts/train.py` prints such errors as a single line instead of a traceback.
"""


class MtanError(Exception):
  """Base class for errors caused by user input, reported as one line."""


class ConfigError(MtanError):
  """An invalid configuration value or an unknown key/task/weighting."""


class DataError(MtanError):
  """Missing or malformed data: wrong layout, shape, dtype or value range."""


class NonFiniteLossError(MtanError):
  """The training loss became NaN or Inf."""


def one_line(text) -> str:
  """Collapses whitespace, so that a library's message quoted in ours keeps it on one line."""
  return ' '.join(str(text).split())
