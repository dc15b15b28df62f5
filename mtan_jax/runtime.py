"""Process-wide JAX settings a run asks for in its config, applied before the first compile.

- `config.deterministic`: bitwise-reproducible GPU runs. XLA:GPU picks convolution
  algorithms by timing them (autotuning) and some reductions and scatters use atomics, so
  two GPU runs of the same config can differ in the last bits. `--xla_gpu_deterministic_ops=true`
  (which implies `--xla_gpu_exclude_nondeterministic_ops=true`) makes XLA use deterministic
  kernels only, at some speed cost. It is read from `XLA_FLAGS` when the backend starts, so
  it must be set before JAX touches a device: `scripts/train.py` starts no device before
  `train_and_evaluate`, which calls `configure` first. On CPU, runs are bitwise reproducible
  without it (tests/test_soak.py checks this).
- `config.compilation_cache_dir`: JAX's persistent compilation cache. A run restarted after a
  preemption loads its compiled steps from disk instead of compiling them again.
"""

from __future__ import annotations

import logging
import os

import jax
from jax._src import xla_bridge

from mtan_jax.errors import ConfigError

log = logging.getLogger('mtan_jax')

DETERMINISTIC_XLA_FLAGS = ('--xla_gpu_deterministic_ops=true',)


def _flag_names(xla_flags: str) -> set[str]:
  return {f.split('=')[0] for f in xla_flags.split()}


def deterministic_flags_set() -> bool:
  """Whether `XLA_FLAGS` holds every flag of `DETERMINISTIC_XLA_FLAGS` (with its value)."""
  present = set(os.environ.get('XLA_FLAGS', '').split())
  return all(f in present for f in DETERMINISTIC_XLA_FLAGS)


def configure(config) -> None:
  """Applies `config.deterministic` and `config.compilation_cache_dir` to this process."""
  if config.get('deterministic', False) and not deterministic_flags_set():
    if xla_bridge.backends_are_initialized():
      # Too late for XLA_FLAGS; only GPUs need them (CPU runs are deterministic anyway).
      if jax.default_backend() == 'gpu':
        raise ConfigError('config.deterministic=True needs XLA_FLAGS='
                          f'{" ".join(DETERMINISTIC_XLA_FLAGS)} before JAX starts its GPU backend, and '
                          'it had already started; set the environment variable yourself or pass '
                          'the config to scripts/train.py')
    else:
      taken = _flag_names(os.environ.get('XLA_FLAGS', ''))
      extra = [f for f in DETERMINISTIC_XLA_FLAGS if f.split('=')[0] not in taken]
      clash = [f for f in DETERMINISTIC_XLA_FLAGS if f.split('=')[0] in taken]
      if clash:
        raise ConfigError(f'config.deterministic=True but XLA_FLAGS already sets {clash[0].split("=")[0]} '
                          f'to something else ({os.environ["XLA_FLAGS"]!r}); remove it from XLA_FLAGS')
      os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *extra]).strip()
      log.info('deterministic XLA ops: XLA_FLAGS=%s', os.environ['XLA_FLAGS'])
  cache_dir = config.get('compilation_cache_dir', '')
  if cache_dir:
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(cache_dir))
    # The train step of a small model compiles in seconds: cache everything that takes >= 1 s.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
