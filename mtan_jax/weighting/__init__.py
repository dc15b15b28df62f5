"""Task weighting: every method behind one interface, chosen by `config.weighting`.

Loss-based (`Method.loss` turns the per-task losses into the differentiated total):
  equal, fixed, dwa, uncertainty (`classic`), rlw, gls, famo.
Gradient-based (`GradientMethod.combine` turns the per-task gradients of the shared
parameters into their update, inside the same compiled step; see `base`):
  mgda, gradnorm, pcgrad, graddrop, gradvac, imtl_g, cagrad, nash_mtl, aligned_mtl, upgrad, db_mtl.

Each method is one module of this package; its docstring gives the paper, the formula and the
hyper-parameters with their defaults, which `config.weighting_params` ("name=value,...")
overrides. The epoch-level bookkeeping (per-epoch loss averages, DWA's lambdas) that every
method shares is in `epochs`.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import jax

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.base import GradientMethod, Method, gram, task_norms, weighted_sum
from mtan_jax.weighting.epochs import (WeightingState, accumulate, check_weights, dwa_weights,
                                       end_epoch, init_state)

# name -> (module, class). Imported lazily: a run pays only for its own method.
_REGISTRY: dict[str, tuple[str, str]] = {
    'equal': ('classic', 'Equal'),
    'fixed': ('classic', 'Fixed'),
    'dwa': ('classic', 'DWA'),
    'uncertainty': ('classic', 'Uncertainty'),
    'rlw': ('rlw', 'RLW'),
    'gls': ('gls', 'GLS'),
    'famo': ('famo', 'FAMO'),
    'mgda': ('mgda', 'MGDA'),
    'gradnorm': ('gradnorm', 'GradNorm'),
    'pcgrad': ('pcgrad', 'PCGrad'),
    'graddrop': ('graddrop', 'GradDrop'),
    'gradvac': ('gradvac', 'GradVac'),
    'imtl_g': ('imtl_g', 'IMTLG'),
    'cagrad': ('cagrad', 'CAGrad'),
    'nash_mtl': ('nash_mtl', 'NashMTL'),
    'aligned_mtl': ('aligned_mtl', 'AlignedMTL'),
    'upgrad': ('upgrad', 'UPGrad'),
    'db_mtl': ('db_mtl', 'DBMTL'),
}
METHODS = tuple(_REGISTRY)

__all__ = ['METHODS', 'GradientMethod', 'Method', 'WeightingState', 'accumulate', 'check_method',
           'check_weights', 'combine', 'dwa_weights', 'end_epoch', 'gram', 'init_state',
           'is_gradient_method', 'make', 'method_class', 'parse_params', 'task_norms',
           'weighted_sum']


def check_method(method: str) -> str:
  if method not in _REGISTRY:
    raise ConfigError(f'unknown config.weighting={method!r}; expected one of {", ".join(METHODS)}')
  return method


def method_class(method: str) -> type[Method]:
  module, cls = _REGISTRY[check_method(method)]
  return getattr(importlib.import_module(f'mtan_jax.weighting.{module}'), cls)


def is_gradient_method(method: str) -> bool:
  """Whether `method` needs the per-task gradients of the shared parameters."""
  return bool(method_class(method).gradient)


def parse_params(params: Any) -> dict[str, Any]:
  """`config.weighting_params` as a dict: '' / None, a mapping, or "name=value,name=value"."""
  if not params:
    return {}
  if isinstance(params, Mapping) or hasattr(params, 'to_dict'):
    items = dict(params.to_dict() if hasattr(params, 'to_dict') else params).items()
  elif isinstance(params, str):
    items = []
    for part in params.split(','):
      name, sep, value = part.partition('=')
      if not sep or not name.strip():
        raise ConfigError(f'config.weighting_params={params!r}: {part!r} is not name=value')
      items.append((name.strip(), value.strip()))
  else:
    raise ConfigError(f'config.weighting_params={params!r}; expected "name=value,..." or a dict')
  out = {}
  for name, value in items:
    try:
      out[name] = float(value)
    except (TypeError, ValueError):
      # A name (e.g. mgda's normalization=l2): the method converts it or refuses it.
      out[name] = value
  return out


def make(method: str, num_tasks: int, params: Any = None) -> Method:
  """The configured method object for `num_tasks` tasks."""
  return method_class(method)(num_tasks, **parse_params(params))


def combine(method: str, losses, state: WeightingState, logsigma, key=None):
  """Total loss of a loss-based method from the per-task losses (K,), from the method's
  initial state (the train step threads the real state and step key)."""
  m = make(method, losses.shape[0])
  key = jax.random.key(0) if key is None else key
  total, _ = m.loss(losses, state['weights'], m.init_state(None), key, logsigma)
  return total
