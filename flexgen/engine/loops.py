"""The training loop: mmengine's iteration loop with O(1) resume and step-seeded noise."""
import logging
import math
from typing import Sequence

import torch
from mmengine.hooks import CheckpointHook, LoggerHook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import IterBasedTrainLoop
from mmengine.runner.loops import _InfiniteDataloaderIterator

from flexgen.registry import LOOPS


@LOOPS.register_module()
class FlexTrainLoop(IterBasedTrainLoop):
    """``IterBasedTrainLoop`` that resumes without replaying data and seeds each step.

    Arguments are those of ``IterBasedTrainLoop`` (``max_iters``, ``val_begin``,
    ``val_interval``, ``dynamic_intervals``). Differences:

    - **Resume.** mmengine's loop loads and throws away every batch up to the resumed
      iteration. If the train dataloader's ``batch_sampler`` has ``set_start_iter(it)``
      (flexgen's bucket and token-budget samplers: infinite, and positioned by the step
      alone), this loop calls it and opens the dataloader there: the cost no longer grows
      with the iteration. Other samplers fall back to mmengine's replay, with a warning.
    - **Seeds.** Before each ``train_step``, a dict ``data_samples`` gets
      ``seed`` (``runner.seed``) and ``step`` (the iteration). Models derive their random
      draws (noise, timesteps) from ``(seed, step, image index)`` instead of the global
      RNG, so resumed and multi-process runs draw exactly what one uninterrupted process
      draws, with no RNG state in the checkpoint.
    - **No host sync per step.** A step's scalars (loss terms, the gradient norm of a
      ``FlexOptimWrapper``) stay on the device; at the logger's, the checkpoint hook's and
      validation's intervals (and the last iteration) one copy reads them all and they
      are logged in step order (``FlexRuntimeInfoHook`` leaves them to the loop). Hooks
      still get each step's ``outputs`` (device tensors).
    - **Checks.** A dataset with more classes than the model is refused before step 1.
      A non-finite loss stops training at that flush (``FloatingPointError`` naming the
      step and the batch's items), before any hook of the flushing step: checkpoints are
      saved only at flushes, so none of a diverged model is written and no finite one is
      pruned.
    """

    logs_step_scalars = True  # FlexRuntimeInfoHook leaves them to the loop
    _pending: list = None
    _intervals = None

    def run(self):
        self._pending, self._intervals = [], None
        self._check_classes()
        self.runner.call_hook('before_train')
        # An iteration-based run is one big epoch, as in mmengine.
        self.runner.call_hook('before_train_epoch')
        if self._iter > 0:
            self._skip_to(self._iter)
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            # A hook method of flexgen's loop (hooks without it are skipped): the step,
            # batch loading included, starts here (TrainStepTimerHook times it).
            self.runner.call_hook('before_train_fetch')
            data_batch = next(self.dataloader_iterator)
            self.run_iter(data_batch)
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0
                         or self._iter == self._max_iters)):
                self.runner.val_loop.run()
        self.runner.call_hook('after_train_epoch')
        self.runner.call_hook('after_train')
        return self.runner.model

    def run_iter(self, data_batch: Sequence[dict]) -> None:
        samples = data_batch.get('data_samples') if isinstance(data_batch, dict) else None
        if isinstance(samples, dict):
            samples['seed'] = self.runner.seed
            samples['step'] = self._iter
        indices = samples.get('index') if isinstance(samples, dict) else None
        if isinstance(indices, torch.Tensor) and indices.device.type == 'cpu':
            indices = indices.clone()  # the collate's host copy, for error messages
        self.runner.call_hook('before_train_iter', batch_idx=self._iter, data_batch=data_batch)
        outputs = self.runner.model.train_step(data_batch,
                                               optim_wrapper=self.runner.optim_wrapper)
        self._log_step(outputs, indices)
        if self._flush_due():  # before any hook: the checkpoint hook saves only after it
            self._flush_logs()
        self.runner.call_hook('after_train_iter', batch_idx=self._iter, data_batch=data_batch,
                              outputs=outputs)
        self._iter += 1

    # ------------------------------------------------------------------ step scalars
    def _log_step(self, outputs, indices) -> None:
        """Keep the step's scalars (loss terms, the optimiser's gradient norm) on the
        device until the next flush."""
        scalars = {k: v.detach().float().reshape(()) for k, v in (outputs or {}).items()
                   if isinstance(v, torch.Tensor) and v.numel() == 1}
        norm = getattr(self.runner.optim_wrapper, 'last_grad_norm', None)
        if isinstance(norm, torch.Tensor):
            scalars[getattr(self.runner.optim_wrapper, 'grad_name', 'grad_norm')] = \
                norm.float().reshape(())
            self.runner.optim_wrapper.last_grad_norm = None
        if scalars:
            self._pending.append((self._iter, list(scalars), torch.stack(list(scalars.values())),
                                  indices))

    def _flush_due(self) -> bool:
        """Flush at the logger's, the checkpoint hook's and validation's iterations and at
        the last one."""
        done = self._iter + 1
        return done >= self._max_iters or any(done % k == 0 for k in self._flush_intervals())

    def _flush_intervals(self):
        if self._intervals is None:
            intervals = {self.val_interval} if self.runner.val_loop is not None else set()
            for hook in self.runner.hooks:
                interval = getattr(hook, 'interval', None)
                if isinstance(hook, (LoggerHook, CheckpointHook)) and \
                        isinstance(interval, int) and interval > 0:
                    intervals.add(interval)
            self._intervals = intervals
        return self._intervals

    def _flush_logs(self) -> None:
        """Read every pending step's scalars in one device-to-host copy, log them in step
        order as mmengine's RuntimeInfoHook would have, and stop at the first step whose
        loss was not finite: no checkpoint of a diverged model is written."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.cat([v for _, _, v, _ in pending]).tolist()
        hub, offset = self.runner.message_hub, 0
        for iteration, names, _, indices in pending:
            step = dict(zip(names, values[offset:offset + len(names)]))
            offset += len(names)
            bad = {k: v for k, v in step.items()
                   if k.startswith('loss') and not math.isfinite(v)}
            if bad:
                self._refuse_non_finite(iteration, step, indices)
            for name, value in step.items():
                hub.update_scalar(f'train/{name}', value)

    @staticmethod
    def _refuse_non_finite(iteration, step, indices):
        terms = ', '.join(f'{k}={v:.4g}' for k, v in step.items() if k.startswith('loss'))
        where = (f' The batch held dataset items {indices.tolist()[:16]} (check them for NaN '
                 'or inf values).' if isinstance(indices, torch.Tensor) else '')
        raise FloatingPointError(
            f'Non-finite loss at iteration {iteration + 1} ({terms}).{where} Training '
            'stopped: no checkpoint was written since, the previous ones are whole. Lower '
            'the learning rate, clip gradients (optim_wrapper.clip_grad) or fix the data, '
            'then resume.')

    def _check_classes(self) -> None:
        """A dataset with more classes than the model would train its extra classes as
        "no class" (id ``num_classes``) or crash mid-run: refuse it before step 1."""
        model = self.runner.model.module if is_model_wrapper(self.runner.model) \
            else self.runner.model
        num_classes = getattr(model, 'num_classes', None)
        dataset = getattr(self.dataloader, 'dataset', None)
        classes = (getattr(dataset, 'metainfo', None) or {}).get('classes')
        if num_classes is not None and classes is not None and len(classes) > num_classes:
            shown = ', '.join(map(str, classes[:5])) + (', ...' if len(classes) > 5 else '')
            raise ValueError(
                f'{type(dataset).__name__} has {len(classes)} classes ({shown}) but '
                f'model.backbone.num_classes is {num_classes}: its labels >= {num_classes} '
                'do not exist in the model. Raise num_classes or pass the dataset the '
                'classes to use.')

    def _skip_to(self, start_iter: int) -> None:
        batch_sampler = getattr(self.dataloader, 'batch_sampler', None)
        if not hasattr(batch_sampler, 'set_start_iter'):
            sampler = getattr(batch_sampler, 'sampler', None)
            name = type(batch_sampler).__name__ + (
                f'(sampler={type(sampler).__name__})' if sampler is not None else '')
            print_log(f'{name} has no set_start_iter(), so resuming replays the dataloader: '
                      f'{start_iter} batches are loaded and discarded. Use a batch sampler '
                      'with set_start_iter (BucketBatchSampler, TokenBudgetBatchSampler) '
                      'to resume at once.', logger='current',
                      level=logging.WARNING)
            for _ in range(start_iter):
                next(self.dataloader_iterator)
            return
        # The base class opened the dataloader in __init__, before the resumed iteration
        # was known: its workers may be prefetching batches 0, 1, ... Close it, then open
        # the dataloader again at `start_iter`.
        self._close_iterator()
        batch_sampler.set_start_iter(start_iter)
        self.dataloader_iterator = _InfiniteDataloaderIterator(self.dataloader)
        print_log(f'Resumed the dataloader at iteration {start_iter} '
                  f'({type(batch_sampler).__name__}.set_start_iter).', logger='current')

    def _close_iterator(self) -> None:
        iterator = getattr(self.dataloader_iterator, '_iterator', None)
        # Persistent workers are reused: DataLoader.__iter__ resets them and drains the
        # stale prefetched batches. Other worker iterators are shut down here.
        persistent = getattr(self.dataloader, 'persistent_workers', False)
        if iterator is not None and not persistent and hasattr(iterator, '_shutdown_workers'):
            iterator._shutdown_workers()
        self.dataloader_iterator = None
