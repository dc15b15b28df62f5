"""`train_and_evaluate(config, workdir)`: the whole training run, importable and testable.

Phases, in order: config checks -> data -> model & optimizer -> devices -> restore ->
compiled steps -> loop (train, log, checkpoint, evaluate each epoch) -> final report.

The loop never waits for the device between steps: metrics stay on device and are fetched
only at log points, where the non-finite-loss flag is checked too. Re-running with the same
workdir resumes from the newest checkpoint; because the data order is a pure function of
(seed, epoch) and the step, a resumed run continues exactly where the killed one was.
"""

from __future__ import annotations

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

from mtan_jax import evaluation, report, runs, sharding
from mtan_jax.checkpointing import Checkpointer
from mtan_jax.data import make_sources
from mtan_jax.data.pipeline import (KEY_SPECS, eval_batches, example_shape, train_batches,
                                    transforms_from_config)
from mtan_jax.distributed import maybe_initialize
from mtan_jax.errors import ConfigError, NonFiniteLossError
from mtan_jax.logs import MetricWriter
from mtan_jax.models.segnet import check_input_size
from mtan_jax.steps import Steps, TrainState, create_model, make_optimizer
from mtan_jax.tasks import make_tasks

log = logging.getLogger('mtan_jax')


def _batch_spec(keys, image_size, size, data_sharding, image_channels, with_mask=False):
  shapes = {k: (example_shape(k, *image_size, image_channels), KEY_SPECS[k][0]) for k in keys}
  if with_mask:
    shapes['mask'] = ((), np.float32)
  return sharding.batch_spec(shapes, size, data_sharding)


def _check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  positive = ('batch_size', 'eval_batch_size', 'num_epochs', 'log_every_steps',
              'checkpoint_every_steps', 'report_last_epochs', 'keep_checkpoints')
  for key in positive:
    if int(config[key]) < 1:
      raise ConfigError(f'config.{key}={config[key]}; expected a positive integer')
  if config.lr <= 0:
    raise ConfigError(f'config.lr={config.lr}; expected > 0')
  if config.dwa_temperature <= 0:
    raise ConfigError(f'config.dwa_temperature={config.dwa_temperature}; expected > 0')
  if int(config.head_hidden) < 1:
    raise ConfigError(f'config.head_hidden={config.head_hidden}; expected a positive integer')
  if int(config.vis_images) < 0:
    raise ConfigError(f'config.vis_images={config.vis_images}; expected >= 0 (0 turns the grids off)')
  if int(config.fsdp_min_size) < 0:
    raise ConfigError(f'config.fsdp_min_size={config.fsdp_min_size}; expected >= 0')
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % num_devices:
      raise ConfigError(f'config.{key}={config[key]} is not divisible by the {num_devices} devices; '
                        f'the batch is split evenly across devices')


def _check_finite(state: TrainState, checkpointer: Checkpointer) -> None:
  bad = int(sharding.to_host(state.nonfinite_step))
  if bad >= 0:
    last = checkpointer.latest_step()
    kept = f'the last good checkpoint is step {last} in {checkpointer.directory}' if last is not None \
        else 'no checkpoint was saved before it'
    raise NonFiniteLossError(f'the training loss became NaN or Inf at step {bad}; stopped, {kept}. '
                             f'Try a lower config.lr or check the data')


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
  # --- Processes, devices, config and data ------------------------------------------------
  maybe_initialize(config)
  if config.dtype == 'float64':
    # Process-wide, before any array exists: 64-bit compute for numerical checks.
    jax.config.update('jax_enable_x64', True)
  if jax.process_index() != 0:
    # Every process runs the same loop; one of them speaks.
    log.setLevel(logging.WARNING)
  mesh = sharding.make_mesh()
  _check_config(config, mesh.size)
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

  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json(indent=2))

  # --- Model, optimizer, shardings and compiled steps --------------------------------------
  def make_model():
    return create_model(config.model, tasks, config.widths, config.seed, config.dtype,
                        in_channels=transforms.image_channels, task_stacking=config.task_stacking,
                        image_size=train_source.shape, head_hidden=config.head_hidden)

  tx, schedule = make_optimizer(config, steps_per_epoch)
  # The model is only traced here (no arrays): the state is created directly on the devices.
  steps = Steps(nnx.eval_shape(make_model), tx, config.weighting, config.dwa_temperature,
                tuple(config.task_weights), config.weighting_params, config.seed,
                config.per_task_grads)
  state_shapes = jax.eval_shape(lambda: steps.state_from_model(make_model()))
  shardings = sharding.state_shardings(state_shapes, mesh, bool(config.fsdp), int(config.fsdp_min_size))
  if config.fsdp:
    sharding.configure_fsdp(steps, shardings, mesh)
  data_sharding = sharding.batch_sharding(mesh)
  train_rows = sharding.process_rows(data_sharding, batch_size)
  compiled = sharding.compile_steps(
      steps, state_shapes, shardings,
      _batch_spec(keys, train_source.shape, batch_size, data_sharding, transforms.image_channels),
      _batch_spec(keys, val_source.shape, eval_batch_size, data_sharding, transforms.image_channels,
                  with_mask=True), mesh)
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
    state, meta = checkpointer.restore(sharding.with_shardings(state_shapes, shardings))
    # An imported checkpoint (scripts/convert_torch_checkpoint.py) has no data position yet.
    for key, value in data_meta.items() if meta['data'] else ():
      if meta['data'].get(key) != value:
        raise ConfigError(f'{checkpointer.directory} was written with {key}={meta["data"].get(key)} but '
                          f'this run has {key}={value}; the run cannot resume, use a new --workdir')
    history = list(meta['history'])
    log.info('resumed from step %d in %s', int(sharding.to_host(state.step)), checkpointer.directory)
  else:
    state = sharding.init_state(steps, make_model, shardings)
    if config.encoder_init:
      from mtan_jax.models.vgg_init import init_encoder_from_vgg16  # pylint: disable=g-import-not-at-top
      # Replaced leaves keep each parameter's sharding.
      state = state.replace(params=init_encoder_from_vgg16(state.params, config.encoder_init,
                                                           transforms.image_channels))
      log.info('encoder initialised from VGG16 weights in %s', config.encoder_init)

  def save(state: TrainState) -> None:
    _check_finite(state, checkpointer)
    checkpointer.save(int(sharding.to_host(state.step)), state, {'data': data_meta, 'history': history})

  # --- Loop ------------------------------------------------------------------------------
  writer = MetricWriter(workdir, tensorboard=config.tensorboard)
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
          _check_finite(state, checkpointer)
          rate = (step - n0) * batch_size / max(time.perf_counter() - t0, 1e-9)
          writer.write(step, {'loss': fetched['loss'],
                              **{f'{t.name}_loss': v for t, v in zip(tasks, fetched['task_losses'])},
                              # d total / d L_t (loss-based) or the method's combination weights.
                              **{f'{t.name}_weight': v for t, v in zip(tasks, fetched['task_weights'])},
                              **{f'{t.name}_grad_norm': v
                                 for t, v in zip(tasks, fetched.get('grad_norms', ()))},
                              'lr': float(schedule(step - 1)), 'images_per_sec': rate}, prefix='train')
          bar.set_postfix(loss=f'{float(fetched["loss"]):.4f}')
        # A save at the epoch boundary waits for end_epoch (below), so resume never skips it.
        if step % config.checkpoint_every_steps == 0 and step % steps_per_epoch:
          save(state)
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
                       'weights': dict(zip(names, sharding.to_host(state.weighting['weights']).tolist()))}
      if config.weighting == 'uncertainty':
        # The learned log-variances s_k; the loss weight of task k is 1 / (2 exp(s_k)).
        epoch_scalars['logsigma'] = dict(zip(names, sharding.to_host(state.params['logsigma'][...]).tolist()))
      writer.write(step, epoch_scalars, prefix='train_epoch')
      save(state)
  finally:
    bar.close()
    checkpointer.close()
    writer.close()

  # --- Report ----------------------------------------------------------------------------
  summary = report.summarize(history, config.report_last_epochs, baselines)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'final_metrics.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
    print(report.format_table(summary), flush=True)
  return summary
