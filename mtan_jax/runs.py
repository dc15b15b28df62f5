"""Reading a finished or running training workdir: its config, history and logs.

A workdir written by `train_and_evaluate` holds:

- `config.json`: the run's whole config (`load_config`);
- `history.json`: one record per evaluated epoch, {'epoch', 'step', 'val': {task: {metric}},
  'train': {task: {'loss'}}} (`read_history`), rewritten atomically after every evaluation;
- `metrics.jsonl`: every logged scalar as {'step': s, 'prefix/name': value} lines
  (`read_scalars`); a run that was killed and resumed logs some steps twice, the later line
  wins;
- `checkpoints/<step>/`: orbax checkpoints (`mtan_jax.restore` loads them);
- `final_metrics.json`, `compiled.json`, `images/`, `tb/`.

Nothing here imports TensorFlow or builds a model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from mtan_jax.errors import DataError, one_line

CONFIG_FILE = 'config.json'
HISTORY_FILE = 'history.json'
METRICS_FILE = 'metrics.jsonl'


def _read_json(path: str, what: str) -> Any:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    raise DataError(f'{path} does not exist; expected {what}') from None
  except (OSError, ValueError) as exc:
    # ValueError: invalid JSON, or bytes that are not UTF-8 (UnicodeDecodeError).
    raise DataError(f'{path} is unreadable ({one_line(exc)}); expected {what}') from None


def _tuples(value: Any) -> Any:
  """JSON turns the config's tuples into lists; configs/*.py use tuples, so restore them."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`)."""
  if not os.path.isdir(workdir):
    raise DataError(f'workdir {workdir} does not exist; expected a directory written by scripts/train.py')
  table = _read_json(os.path.join(workdir, CONFIG_FILE), 'the config.json that scripts/train.py writes')
  if not isinstance(table, dict) or 'model' not in table or 'tasks' not in table:
    raise DataError(f'{os.path.join(workdir, CONFIG_FILE)} is not a training config (no model/tasks key)')
  return ml_collections.ConfigDict(_tuples(table))


def write_json_atomic(path: str, value: Any) -> None:
  """Writes JSON so that a reader (or a crash) never sees a half-written file."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_history(workdir: str) -> list[dict[str, Any]]:
  """Per-epoch evaluation records; falls back to the val lines of metrics.jsonl for runs
  written before history.json existed (those records have no 'train' entry)."""
  path = os.path.join(workdir, HISTORY_FILE)
  if os.path.exists(path):
    history = _read_json(path, 'a list of per-epoch records')
    if not isinstance(history, list):
      raise DataError(f'{path} holds {type(history).__name__}; expected a list of per-epoch records')
    for index, record in enumerate(history):
      _check_record(path, index, record)
    return history
  records = []
  for step, values in sorted(read_scalars(workdir).items()):
    val: dict[str, dict[str, float]] = {}
    for name, value in values.items():
      parts = name.split('/')
      if len(parts) == 3 and parts[0] == 'val':
        val.setdefault(parts[1], {})[parts[2]] = value
    if val:
      records.append({'step': step, 'epoch': len(records) + 1, 'val': val})
  return records


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_record(path: str, index: int, record: Any) -> None:
  """One history.json record: what the report and comparisons read must have its shape."""
  expected = "expected {'epoch': int, 'step': int, 'val': {task: {metric: number}}, 'train': ...}"
  if not isinstance(record, dict):
    raise DataError(f'{path}: record {index} is {repr(record)[:60]}; {expected}')
  for key in ('epoch', 'step'):
    if key in record and not (isinstance(record[key], int) and not isinstance(record[key], bool)):
      raise DataError(f'{path}: record {index} has {key}={repr(record[key])[:60]}; {expected}')
  val = record.get('val', {})
  tables = val.values() if isinstance(val, dict) else [val]
  for table in tables:
    if not isinstance(table, dict) or not all(_is_number(v) for v in table.values()):
      raise DataError(f'{path}: record {index} has val={repr(val)[:80]}; {expected}')


def read_scalars(workdir: str) -> dict[int, dict[str, float]]:
  """{step: {name: value}} from metrics.jsonl; repeated (step, name) pairs keep the last value."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise DataError(f'{path} does not exist; expected the log of a run written by scripts/train.py')
  out: dict[int, dict[str, float]] = {}
  try:
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        line = line.strip()
        if not line:
          continue
        try:
          record = json.loads(line)
          step = int(record.pop('step'))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
          # A run killed mid-write leaves a partial last line; anything else is corruption.
          if f.read().strip():
            raise DataError(f'{path}:{number} is not a JSON record with a step') from None
          break
        bad = [k for k, v in record.items() if not _is_number(v)]
        if bad:
          raise DataError(f'{path}:{number}: {bad[0]}={repr(record[bad[0]])[:40]} is not a number; '
                          f'expected {{"step": int, "name": number, ...}} as MetricWriter writes')
        out.setdefault(step, {}).update({k: float(v) for k, v in record.items()})
  except UnicodeDecodeError as exc:
    # MetricWriter writes ASCII JSON: other bytes mean a damaged file.
    raise DataError(f'{path} is not UTF-8 text ({one_line(exc)}); expected the JSON lines that '
                    f'scripts/train.py writes') from None
  return out


def series(scalars: dict[int, dict[str, float]], name: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one scalar, in step order."""
  steps = sorted(s for s, values in scalars.items() if name in values)
  return steps, [scalars[s][name] for s in steps]
