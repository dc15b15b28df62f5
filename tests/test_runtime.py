"""runtime.configure: the deterministic-ops XLA flag and the persistent compilation cache."""

import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from conftest import REPO
from mtan_jax import runtime
from mtan_jax.errors import ConfigError


def test_deterministic_flag_is_set_before_the_backend_starts(tmp_path):
  # A fresh process: XLA_FLAGS is only read when JAX starts its backend.
  code = ('import os, ml_collections, jax\n'
          'from mtan_jax import runtime\n'
          f'runtime.configure(ml_collections.ConfigDict({{"deterministic": True, "compilation_cache_dir": {str(tmp_path / "cache")!r}}}))\n'
          'print(os.environ["XLA_FLAGS"])\n'
          'print(jax.config.jax_compilation_cache_dir)\n'
          'print(float(jax.numpy.ones(3).sum()))\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['XLA_FLAGS'] = '--xla_cpu_enable_fast_math=false'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=300, check=True).stdout.splitlines()
  assert out[0].split() == ['--xla_cpu_enable_fast_math=false', '--xla_gpu_deterministic_ops=true']
  assert out[1] == str(tmp_path / 'cache') and out[2] == '3.0'


def test_a_clashing_xla_flag_is_one_line(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_deterministic_ops=false')
  monkeypatch.setattr(runtime.xla_bridge, 'backends_are_initialized', lambda: False)
  with pytest.raises(ConfigError, match='already sets --xla_gpu_deterministic_ops') as info:
    runtime.configure(ml_collections.ConfigDict({'deterministic': True, 'compilation_cache_dir': ''}))
  assert '\n' not in str(info.value)


def test_cpu_runs_need_no_flag_once_started():
  jax.numpy.ones(1).block_until_ready()  # the backend is up
  before = os.environ.get('XLA_FLAGS')
  runtime.configure(ml_collections.ConfigDict({'deterministic': True, 'compilation_cache_dir': ''}))
  assert os.environ.get('XLA_FLAGS') == before  # too late to matter, and CPU does not need it
