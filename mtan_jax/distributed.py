"""Multi-process start-up: `jax.distributed.initialize()` driven by the config and environment.

One process runs per host (TPU VM, GPU node); all processes run the same program and
together see every device. `config.distributed` chooses when to initialise:

- 'auto' (default): when something says this is one of several processes: a coordinator
  address (`config.coordinator_address` or `JAX_COORDINATOR_ADDRESS`), a SLURM job step with
  more than one task, or a multi-host Cloud TPU slice. Otherwise a single process.
- 'on': always; whatever the config leaves unset (0 / -1 / '') JAX detects itself (TPU pods,
  SLURM, Open MPI, Kubernetes), see `jax.distributed.initialize`.
- 'off': never.

`config.num_processes` (0 = detect) and `config.process_id` (-1 = detect) complete an explicit
coordinator address. On CPU, cross-process collectives use gloo. Must run before anything
touches a JAX device.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax

from mtan_jax.errors import ConfigError

log = logging.getLogger('mtan_jax')

MODES = ('auto', 'on', 'off')


def cluster_detected(environ: Mapping[str, str] = os.environ) -> str | None:
  """Names the multi-process environment we are in, or None for a single process."""
  if environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if environ.get('SLURM_JOB_ID') and int(environ.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'SLURM'
  # Cloud TPU VMs list every worker of the slice; more than one means a multi-host slice.
  workers = environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([w for w in workers.split(',') if w.strip()]) > 1:
    return 'Cloud TPU slice'
  return None


def maybe_initialize(config, environ: Mapping[str, str] = os.environ) -> bool:
  """Initialises the JAX distributed runtime if the config and environment ask for it.

  Returns:
    Whether it was initialised (now or by an earlier call).
  """
  mode = str(config.get('distributed', 'auto'))
  if mode not in MODES:
    raise ConfigError(f'config.distributed={mode!r}; expected one of {", ".join(MODES)}')
  if jax.distributed.is_initialized():
    return True
  address = str(config.get('coordinator_address', '') or '')
  num_processes = int(config.get('num_processes', 0))
  process_id = int(config.get('process_id', -1))
  if num_processes < 0 or (num_processes and not -1 <= process_id < num_processes):
    raise ConfigError(f'config.num_processes={num_processes}, config.process_id={process_id}; '
                      'expected num_processes >= 0 and 0 <= process_id < num_processes (or -1 to detect)')
  reason = 'config.coordinator_address' if address else cluster_detected(environ)
  if mode == 'off' or (mode == 'auto' and reason is None):
    return False
  # Cross-process collectives between CPU devices need an implementation; gloo ships with
  # jaxlib. It only affects the CPU backend, so it is harmless on GPU and TPU hosts.
  if not environ.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if address:
    kwargs['coordinator_address'] = address
  if num_processes:
    kwargs['num_processes'] = num_processes
  if process_id >= 0:
    kwargs['process_id'] = process_id
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as exc:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise ConfigError(f'jax.distributed.initialize({", ".join(f"{k}={v!r}" for k, v in kwargs.items())}) '
                      f'failed: {first}') from None
  log.info('distributed: process %d of %d (%s), %d local of %d devices', jax.process_index(),
           jax.process_count(), reason or 'config.distributed=on', jax.local_device_count(),
           jax.device_count())
  return True
