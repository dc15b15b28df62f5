"""`train_and_evaluate(config, workdir)`: the whole training run, importable and testable.

Phases, in order: config checks -> data -> model & optimizer -> devices -> restore ->
compiled steps -> loop (train, log, checkpoint, evaluate each epoch) -> final report.

The loop never waits for the device between steps: metrics stay on device and are fetched
only at log points, where the non-finite-loss flag is checked too. Re-running with the same
workdir resumes from the newest readable checkpoint; because the data order and the random
numbers are pure functions of (seed, epoch, step), and the weighting state (DWA's loss
history, the epoch's running loss sums, a method's own state) and log-sigma are part of the
checkpointed state, a resumed run is the same run as one never interrupted (bitwise on CPU,
tests/test_soak.py).

What protects the run (README "Interruptions, faults and bad input"): the config is checked
before anything is built (`config_checks`); one run per workdir (`workdir.WorkdirLock`); the
workdir must take a checkpoint before training starts (`workdir.check_writable`); SIGTERM
saves and exits with `config.preemption_exit_code` (`preemption`); a NaN/Inf step is never
applied and, by `config.nonfinite`, stops the run or is skipped and counted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from mtan_jax import evaluation, report, runs, runtime, sharding
from mtan_jax.checkpointing import Checkpointer
from mtan_jax.config_checks import check_config
from mtan_jax.data import make_sources
from mtan_jax.data.pipeline import (KEY_SPECS, eval_batches, example_shape, train_batches,
                                    transforms_from_config)
from mtan_jax.distributed import maybe_initialize
from mtan_jax.errors import ConfigError, NonFiniteLossError
from mtan_jax.logs import MetricWriter
from mtan_jax.models.segnet import check_input_size
from mtan_jax.preemption import Preempted, PreemptionWatcher
from mtan_jax.steps import Steps, TrainState, create_model, make_optimizer, set_hyperparams
from mtan_jax.tasks import make_tasks
from mtan_jax.workdir import WorkdirLock, check_writable

log = logging.getLogger('mtan_jax')


def _batch_spec(keys, image_size, size, data_sharding, image_channels, with_mask=False):
  shapes = {k: (example_shape(k, *image_size, image_channels), KEY_SPECS[k][0]) for k in keys}
  if with_mask:
    shapes['mask'] = ((), np.float32)
  return sharding.batch_spec(shapes, size, data_sharding)


class _FaultWatch:
  """Reads the step's NaN/Inf record at log and save points (the only host syncs).

  'stop': raises with the first bad step and the task whose loss broke there. 'skip': logs
  a warning whenever more steps were skipped since the last look.
  """

  def __init__(self, mode: str, task_names, checkpointer: Checkpointer):
    self.mode, self.task_names, self.checkpointer = mode, list(task_names), checkpointer
    self.skipped = 0

  def check(self, state: TrainState) -> None:
    bad, task, count = (int(v) for v in sharding.to_host(
        (state.nonfinite_step, state.nonfinite_task, state.nonfinite_count)))
    if bad < 0:
      return
    where = (f"the loss of task '{self.task_names[task]}'" if 0 <= task < len(self.task_names)
             else 'a gradient (all task losses finite)')
    if self.mode == 'stop':
      last = self.checkpointer.latest_step()
      kept = (f'the last good checkpoint is step {last} in {self.checkpointer.directory}' if last is not None
              else 'no checkpoint was saved before it')
      raise NonFiniteLossError(f'{where} became NaN or Inf at step {bad}; stopped without applying it, '
                               f'{kept}. Try a lower config.lr, check the data, or set '
                               f'config.nonfinite=skip to skip such batches')
    if count > self.skipped:
      log.warning('%d step(s) with NaN/Inf skipped so far (first at step %d: %s)', count, bad, where)
      self.skipped = count


class _Preview:
  """Draws the evaluation grid: `config.vis_images` fixed validation images, per task the
  target and the prediction, into TensorBoard and `<workdir>/images/step_<N>.png`.

  The images are the first ones of the validation set, loaded once. Every process runs the
  (replicated, jitted) prediction, since parameters may be sharded over all processes;
  process 0 draws.
  """

  def __init__(self, config, steps: Steps, shardings, mesh, val_source, keys, transforms, tasks,
               workdir: str):
    self.count = min(int(config.vis_images), len(val_source))
    if self.count <= 0:
      return
    from mtan_jax import visualize  # pylint: disable=g-import-not-at-top
    self.tasks = tasks
    self.directory = os.path.join(workdir, 'images')
    self.colors = visualize.palette(config.dataset, int(config.num_classes))
    batch = next(iter(eval_batches(val_source, keys, self.count, (0, self.count), transforms, config.seed)))
    self.batch = {k: v for k, v in batch.items() if k != 'mask'}
    rep = sharding.replicated(mesh)
    self.images = jax.make_array_from_process_local_data(rep, self.batch['image'])
    self.predict = jax.jit(steps.predict, in_shardings=(shardings.params, shardings.batch_stats, rep),
                           out_shardings=rep)

  def draw(self, state: TrainState, step: int, writer: MetricWriter) -> None:
    if self.count <= 0:
      return
    from mtan_jax import visualize  # pylint: disable=g-import-not-at-top
    preds = sharding.to_host(self.predict(state.params, state.batch_stats, self.images))
    if jax.process_index() != 0:
      return
    picture = visualize.evaluation_grid(self.tasks, self.batch, preds, self.colors)
    writer.write_image(step, 'val/predictions', picture,
                       os.path.join(self.directory, f'step_{step:08d}.png'))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.model` on `config.dataset`, evaluating every epoch; resumes from `workdir`.

  Args:
    config: the run configuration (see configs/mtan.py for every key).
    workdir: where checkpoints, logs and the final report go.

  Returns:
    The final summary: validation metrics averaged over the last `config.report_last_epochs`
    epochs (and Delta_MTL when baselines are configured).
  """
  # --- Processes, devices, config ----------------------------------------------------------
  # Every key's type and range, before anything reads them; the batch's split over the
  # devices is checked again below, once the device count is known.
  check_config(config, 1)
  runtime.configure(config)  # XLA flags: before JAX starts a backend
  maybe_initialize(config)
  if config.dtype == 'float64':
    # Process-wide, before any array exists: 64-bit compute for numerical checks.
    jax.config.update('jax_enable_x64', True)
  if jax.process_index() != 0:
    # Every process runs the same loop; one of them speaks.
    log.setLevel(logging.WARNING)
  mesh = sharding.make_mesh()
  check_config(config, mesh.size)
  # One run per workdir. Process 0 holds the lock: other hosts may share the file system.
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _train(config, workdir, mesh)


def _train(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, Any]:
  """`train_and_evaluate` once the config is checked and the workdir is ours."""
  # --- Data --------------------------------------------------------------------------------
  tasks = make_tasks(config.tasks, config.num_classes, image_size=tuple(config.image_size))
  transforms = transforms_from_config(config, [t.name for t in tasks])
  baselines = report.load_baselines(config.single_task_baselines)
  train_source, val_source = make_sources(config, [t.name for t in tasks if not t.self_supervised])
  check_input_size(*train_source.shape)
  if any(t.image_level for t in tasks) and tuple(train_source.shape) != tuple(config.image_size):
    raise ConfigError(f'config.image_size={tuple(config.image_size)} but the data is '
                      f'{train_source.shape}; image-level heads are sized for the data, set '
                      f'--config.image_size={train_source.shape}')
  keys = ('image',) + tuple(t.target_key for t in tasks)
  batch_size = int(config.batch_size)
  eval_batch_size = int(config.eval_batch_size)
  steps_per_epoch = len(train_source) // batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f'the training set has {len(train_source)} examples, fewer than '
                      f'config.batch_size={batch_size}')
  total_steps = steps_per_epoch * int(config.num_epochs)

  history = _finished_history(config, workdir, total_steps)
  if history is not None:
    # Rerunning a finished run's command reports its results without compiling anything.
    log.info('%s holds this config trained to its last step (%d); reporting its results', workdir,
             total_steps)
    return _report(history, config, baselines, workdir)

  if jax.process_index() == 0:
    runs.write_json_atomic(os.path.join(workdir, runs.CONFIG_FILE), json.loads(config.to_json()))

  # --- Model, optimizer, shardings and compiled steps --------------------------------------
  def make_model():
    return create_model(config.model, tasks, config.widths, config.seed, config.dtype,
                        in_channels=transforms.image_channels, task_stacking=config.task_stacking,
                        image_size=train_source.shape, head_hidden=config.head_hidden)

  tx, schedule = make_optimizer(config, steps_per_epoch)
  # The model is only traced here (no arrays): the state is created directly on the devices.
  steps = Steps(nnx.eval_shape(make_model), tx, config.weighting, config.dwa_temperature,
                tuple(config.task_weights), config.weighting_params, config.seed,
                config.per_task_grads, config.nonfinite)
  state_shapes = jax.eval_shape(lambda: steps.state_from_model(make_model()))
  if jax.process_index() == 0:
    # Before compiling: a full or unwritable disk fails now, not at the first checkpoint.
    check_writable(workdir, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state_shapes)),
                   int(config.min_free_disk_mb) * 2**20)
  shardings = sharding.state_shardings(state_shapes, mesh, bool(config.fsdp), int(config.fsdp_min_size))
  if config.fsdp:
    sharding.configure_fsdp(steps, shardings, mesh)
  data_sharding = sharding.batch_sharding(mesh)
  train_rows = sharding.process_rows(data_sharding, batch_size)
  compiled = sharding.compile_steps(
      steps, state_shapes, shardings,
      _batch_spec(keys, train_source.shape, batch_size, data_sharding, transforms.image_channels),
      _batch_spec(keys, val_source.shape, eval_batch_size, data_sharding, transforms.image_channels,
                  with_mask=True), mesh,
      grad_norms=bool(config.log_grad_norms) and not steps.weighter.gradient)
  log.info('%d device(s) in %d process(es), batch %d per step (%d per device), %s\n%s',
           mesh.size, jax.process_count(), batch_size, batch_size // mesh.size,
           'FSDP-sharded state' if config.fsdp else 'replicated state', compiled.describe())
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'compiled.json'), 'w', encoding='utf-8') as f:
      json.dump({'devices': mesh.size, 'processes': jax.process_count(),
                 'compile_seconds': compiled.compile_seconds,
                 'memory_bytes_per_device': compiled.memory}, f, indent=2)
  train_step, end_epoch, eval_step = compiled.train_step, compiled.end_epoch, compiled.eval_step

  # --- Restore (or initialise) -------------------------------------------------------------
  checkpointer = Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  history: list[dict[str, Any]] = []
  preview = _Preview(config, steps, shardings, mesh, val_source, keys, transforms, tasks, workdir)
  data_meta = {'seed': int(config.seed), 'batch_size': batch_size, 'steps_per_epoch': steps_per_epoch,
               'num_train': len(train_source)}
  if checkpointer.latest_step() is not None:
    # A newest checkpoint that cannot be read is reported and moved aside; the one before
    # it is used (the steps since are trained again, identically).
    state, meta, _ = checkpointer.restore_newest_readable(sharding.with_shardings(state_shapes, shardings))
    # An imported checkpoint (scripts/convert_torch_checkpoint.py) has no data position yet.
    for key, value in data_meta.items() if meta['data'] else ():
      if meta['data'].get(key) != value:
        raise ConfigError(f'{checkpointer.directory} was written with {key}={meta["data"].get(key)} but '
                          f'this run has {key}={value}; the run cannot resume, use a new --workdir')
    history = list(meta['history'])
    # The learning-rate schedule is optimizer state (one executable for any rate); the
    # config of this run decides it, as it would a schedule compiled into the step.
    state = state.replace(opt_state=set_hyperparams(
        state.opt_state, config.lr, int(config.lr_decay_every_epochs) * steps_per_epoch,
        config.lr_decay_factor))
    log.info('resumed from step %d in %s', int(sharding.to_host(state.step)), checkpointer.directory)
  else:
    state = sharding.init_state(steps, make_model, shardings)
    if config.encoder_init:
      from mtan_jax.models.vgg_init import init_encoder_from_vgg16  # pylint: disable=g-import-not-at-top
      # Replaced leaves keep each parameter's sharding.
      state = state.replace(params=init_encoder_from_vgg16(state.params, config.encoder_init,
                                                           transforms.image_channels))
      log.info('encoder initialised from VGG16 weights in %s', config.encoder_init)

  faults = _FaultWatch(config.nonfinite, [t.name for t in tasks], checkpointer)

  def save(state: TrainState) -> None:
    faults.check(state)
    checkpointer.save(int(sharding.to_host(state.step)), state, {'data': data_meta, 'history': history})

  def stop_for_preemption(state: TrainState, step: int) -> None:
    if checkpointer.latest_step() != step:
      save(state)
    checkpointer.wait()
    raise Preempted(step, checkpointer.directory, int(config.preemption_exit_code),
                    watcher.seconds_since_notice())

  # --- Loop ------------------------------------------------------------------------------
  writer = MetricWriter(workdir, tensorboard=config.tensorboard)
  watcher = PreemptionWatcher(checkpointer.reached_preemption)
  step = int(sharding.to_host(state.step))
  first_epoch = int(sharding.to_host(state.weighting['epochs_done']))
  bar = tqdm(total=total_steps * batch_size, initial=step * batch_size, unit='img', unit_scale=True,
             dynamic_ncols=True, mininterval=2.0,
             disable=not config.progress_bar or jax.process_index() != 0)
  try:
    for epoch in range(first_epoch, int(config.num_epochs)):
      bar.set_description(f'epoch {epoch + 1}/{config.num_epochs}')
      start = step - epoch * steps_per_epoch
      batches = train_batches(train_source, keys, batch_size, epoch, config.seed, start_step=start,
                              rows=train_rows, transforms=transforms)
      t0, n0 = time.perf_counter(), step
      for batch in evaluation.device_batches(batches, data_sharding, train_rows, batch_size):
        state, step_metrics = train_step(state, batch)
        step += 1
        bar.update(batch_size)
        if step % config.log_every_steps == 0:
          fetched = sharding.to_host(step_metrics)
          faults.check(state)
          if compiled.grad_norms is not None:
            fetched['grad_norms'] = sharding.to_host(compiled.grad_norms(state.params, state.batch_stats, batch))
          rate = (step - n0) * batch_size / max(time.perf_counter() - t0, 1e-9)
          writer.write(step, {'loss': fetched['loss'],
                              **{f'{t.name}_loss': v for t, v in zip(tasks, fetched['task_losses'])},
                              # d total / d L_t (loss-based) or the method's combination weights.
                              **{f'{t.name}_weight': v for t, v in zip(tasks, fetched['task_weights'])},
                              **{f'{t.name}_grad_norm': v
                                 for t, v in zip(tasks, fetched.get('grad_norms', ()))},
                              'nonfinite_skipped': fetched['nonfinite_count'],
                              'lr': float(schedule(step - 1)), 'images_per_sec': rate}, prefix='train')
          bar.set_postfix(loss=f'{float(fetched["loss"]):.4f}')
        # A save at the epoch boundary waits for end_epoch (below), so resume never skips it;
        # so does a preemption there (the epoch's own save is its checkpoint).
        if step % steps_per_epoch:
          if step % config.checkpoint_every_steps == 0:
            save(state)
          if watcher.requested(step):
            stop_for_preemption(state, step)
      state = end_epoch(state)
      epoch_avg = sharding.to_host(state.weighting['loss_history'][1])
      record: dict[str, Any] = {'epoch': epoch + 1, 'step': step, 'train': {t.name: {'loss': float(v)}
                                                                for t, v in zip(tasks, epoch_avg)}}
      if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == config.num_epochs:
        record['val'] = evaluation.metrics_over(eval_step, state.params, state.batch_stats, val_source,
                                                keys, eval_batch_size, tasks, data_sharding, transforms,
                                                config.seed)
        writer.write(step, record['val'], prefix='val')
        preview.draw(state, step, writer)
        log.info('epoch %d: %s', epoch + 1, json.dumps(record['val']))
        history.append(record)
        if jax.process_index() == 0:
          runs.write_json_atomic(os.path.join(workdir, runs.HISTORY_FILE), history)
      names = [t.name for t in tasks]
      epoch_scalars = {**record['train'],
                       'weights': dict(zip(names, sharding.to_host(state.weighting['weights']).tolist())),
                       'nonfinite_skipped': int(sharding.to_host(state.nonfinite_count))}
      if config.weighting == 'uncertainty':
        # The learned log-variances s_k; the loss weight of task k is 1 / (2 exp(s_k)).
        epoch_scalars['logsigma'] = dict(zip(names, sharding.to_host(state.params['logsigma'][...]).tolist()))
      writer.write(step, epoch_scalars, prefix='train_epoch')
      save(state)
      if watcher.requested(step) and epoch + 1 < int(config.num_epochs):
        stop_for_preemption(state, step)
  finally:
    watcher.close()
    bar.close()
    checkpointer.close()
    writer.close()

  return _report(history, config, baselines, workdir)


def _report(history, config, baselines, workdir: str) -> dict[str, Any]:
  """The final summary of `history`: written to final_metrics.json, printed, returned."""
  summary = report.summarize(history, config.report_last_epochs, baselines)
  if jax.process_index() == 0:
    runs.write_json_atomic(os.path.join(workdir, 'final_metrics.json'), summary)
    print(report.format_table(summary), flush=True)
  return summary


def _finished_history(config, workdir: str, total_steps: int) -> list[dict[str, Any]] | None:
  """The evaluation history of a run in `workdir` that finished with exactly this config
  (its config.json equal, the newest checkpoint at the last step with every epoch in its
  history); None for anything else, which then takes the usual path (resume or start)."""
  try:
    with open(os.path.join(workdir, runs.CONFIG_FILE), encoding='utf-8') as f:
      if json.load(f) != json.loads(config.to_json()):
        return None
  except (OSError, ValueError):
    return None
  checkpointer = Checkpointer(workdir, async_save=False)
  try:
    if checkpointer.latest_step() != total_steps:
      return None
    history = list(checkpointer.restore_meta(total_steps)['history'])
  except Exception:  # pylint: disable=broad-except
    return None  # unreadable: the usual path reports or repairs it
  finally:
    checkpointer.close()
  if not history or history[-1].get('epoch') != int(config.num_epochs):
    return None
  return history
