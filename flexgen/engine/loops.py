"""The training loop: mmengine's iteration loop with O(1) resume and step-seeded noise."""
import logging
from typing import Sequence

import torch
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import IterBasedTrainLoop
from mmengine.runner.loops import _InfiniteDataloaderIterator

from flexgen.fileio import all_finite
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
    - **Checks.** A dataset with more classes than the model is refused before step 1,
      and a non-finite loss stops training at once (``FloatingPointError`` naming the step
      and the batch's items) before any hook, so no checkpoint of a diverged model is
      written and no finite one is pruned.
    """

    def run(self):
        self._check_classes()
        self.runner.call_hook('before_train')
        # An iteration-based run is one big epoch, as in mmengine.
        self.runner.call_hook('before_train_epoch')
        if self._iter > 0:
            self._skip_to(self._iter)
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
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
        self.runner.call_hook('before_train_iter', batch_idx=self._iter, data_batch=data_batch)
        outputs = self.runner.model.train_step(data_batch,
                                               optim_wrapper=self.runner.optim_wrapper)
        # Before any hook (the checkpoint hook above all) sees this step.
        self._check_finite(outputs, samples)
        self.runner.call_hook('after_train_iter', batch_idx=self._iter, data_batch=data_batch,
                              outputs=outputs)
        self._iter += 1

    def _check_finite(self, outputs: dict, samples) -> None:
        """Stop at the first non-finite loss, naming the step, the loss terms and the
        batch's dataset items; no checkpoint of this step is written."""
        losses = {k: v for k, v in (outputs or {}).items()
                  if k.startswith('loss') and isinstance(v, torch.Tensor)}
        if not losses or all_finite(losses.values()):
            return
        terms = ', '.join(f'{k}={float(v):.4g}' for k, v in losses.items())
        indices = samples.get('index') if isinstance(samples, dict) else None
        where = (f' The batch held dataset items {torch.as_tensor(indices).tolist()[:16]}'
                 ' (check them for NaN or inf values).' if indices is not None else '')
        raise FloatingPointError(
            f'Non-finite loss at iteration {self._iter + 1} ({terms}).{where} Training '
            'stopped: no checkpoint was written for this step, the previous ones are '
            'whole. Lower the learning rate, clip gradients (optim_wrapper.clip_grad) or fix '
            'the data, then resume.')

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
