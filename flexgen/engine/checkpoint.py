"""Training checkpoints that survive a kill and never run code when loaded.

Two guarantees on top of mmengine's ``CheckpointHook``:

- **Atomic writes.** A checkpoint (and the ``last_checkpoint`` pointer that auto-resume
  reads) is written to a temporary file in the same directory, flushed, fsync'ed and
  then ``os.replace``'d over its name: a reader sees the old file or the new one, never
  half of one. Old checkpoints are pruned (``max_keep_ckpts``) only after the new one and
  the pointer are in place, so a kill at any moment leaves a loadable checkpoint that
  ``last_checkpoint`` names.
- **weights_only.** The file holds tensors and plain Python containers and scalars only,
  so it loads with ``torch.load(weights_only=True)``: no pickled code from a checkpoint is
  ever executed. mmengine stores the log-smoothing buffers of its ``MessageHub``
  (``HistoryBuffer`` objects holding numpy arrays) in every checkpoint; they are saved as
  plain dicts of tensors and rebuilt on load, so smoothed logs continue exactly on resume.
"""
import difflib
import inspect
import logging
import os
import os.path as osp
import re
import shutil
import zipfile
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.logging import HistoryBuffer, print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import CheckpointLoader

from flexgen.fileio import (CheckpointError, all_finite, atomic_write, is_temporary,
                            read_checkpoint, weights_problems)
from flexgen.registry import HOOKS
from .sharded_checkpoint import is_sharded_checkpoint
_HISTORY_BUFFER = 'HistoryBuffer'
_PLAIN_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype,
                  torch.device, torch.Size)


# --------------------------------------------------------------------- atomic files
@register_backend('atomic_local', force=True)
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend with atomic ``put`` / ``put_text`` (:func:`atomic_write`).

    Use it with ``backend_args=dict(backend='atomic_local')`` wherever mmengine takes
    ``backend_args``; :class:`FlexCheckpointHook` does so by default.
    """

    def put(self, obj: bytes, filepath) -> None:
        atomic_write(obj, filepath)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        atomic_write(obj.encode(encoding), filepath)


# --------------------------------------------------------------------- plain data
_DROP = object()


def history_buffer_to_plain(buffer: HistoryBuffer) -> dict:
    """A ``HistoryBuffer`` as a dict of tensors (exact: float64 stays float64)."""
    log, count = buffer.data
    return dict(type=_HISTORY_BUFFER, log_history=torch.from_numpy(np.array(log)),
                count_history=torch.from_numpy(np.array(count)),
                max_length=int(buffer.max_length))


def plain_to_history_buffer(state: dict) -> HistoryBuffer:
    return HistoryBuffer(state['log_history'].numpy(), state['count_history'].numpy(),
                         state['max_length'])


def to_plain(obj, path: str = 'checkpoint', dropped: list = None):
    """Return ``obj`` with every value a tensor or a plain Python container / scalar.

    numpy arrays become tensors, numpy scalars Python numbers, ``HistoryBuffer`` a plain
    dict (:func:`history_buffer_to_plain`), dict subclasses (``ConfigDict``) plain dicts.
    Anything else (a function, an arbitrary object) cannot be stored without pickling
    code: it is left out, and its path is appended to ``dropped``.
    """
    dropped = [] if dropped is None else dropped
    if isinstance(obj, torch.Tensor):
        return obj.detach() if type(obj) is not torch.Tensor else obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _PLAIN_SCALARS):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in 'biufc':
            return torch.from_numpy(np.array(obj))
        return to_plain(obj.tolist(), path, dropped)
    if isinstance(obj, HistoryBuffer):
        return history_buffer_to_plain(obj)
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                dropped.append(f'{path}[{key!r}]')
                continue
            plain = to_plain(value, f'{path}[{key!r}]', dropped)
            if plain is not _DROP:
                out[key] = plain
        return out
    if isinstance(obj, (list, tuple, set)):
        items = [to_plain(v, f'{path}[{i}]', dropped) for i, v in enumerate(obj)]
        if any(v is _DROP for v in items):  # a container is kept whole or not at all
            return _DROP
        return set(items) if isinstance(obj, set) else (
            list(items) if isinstance(obj, list) else tuple(items))
    dropped.append(f'{path} ({type(obj).__name__})')
    return _DROP


def restore_message_hub(checkpoint: dict) -> None:
    """Rebuild the ``HistoryBuffer`` objects that :func:`to_plain` flattened, in place."""
    scalars = checkpoint.get('message_hub', {}).get('log_scalars', {})
    for key, value in scalars.items():
        if isinstance(value, dict) and value.get('type') == _HISTORY_BUFFER:
            scalars[key] = plain_to_history_buffer(value)


# --------------------------------------------------------------------- loading
@CheckpointLoader.register_scheme(prefixes='', force=True)
def load_from_local(filename, map_location):
    """mmengine's loader for local files, through :func:`flexgen.fileio.read_checkpoint`
    (``weights_only=True`` stated explicitly, so no environment variable or torch default
    can turn it off; errors name the file and never advise turning the safety off)."""
    checkpoint = read_checkpoint(filename, map_location=map_location)
    # A weights file (e.g. tools/consolidate_checkpoint.py's) in mmengine's layout.
    return dict(state_dict=checkpoint) if filename.endswith('.safetensors') else checkpoint


# --------------------------------------------------------------------- the hook
def _iteration(name: str) -> int:
    match = re.fullmatch(r'iter_(\d+)\.pth', name)
    return int(match.group(1)) if match else -1


def newest_checkpoint(work_dir: str) -> Optional[str]:
    """The ``iter_<N>.pth`` of ``work_dir`` with the largest ``N`` that is a whole file
    (a complete zip archive, as ``torch.save`` writes) or sharded checkpoint directory
    (renamed into place only once complete), or ``None``."""
    names = sorted((n for n in os.listdir(work_dir) if _iteration(n) >= 0),
                   key=_iteration, reverse=True) if osp.isdir(work_dir) else []
    for name in names:
        path = osp.join(work_dir, name)
        if zipfile.is_zipfile(path) or is_sharded_checkpoint(path):
            return osp.join(work_dir, name)
    return None


def resolve_last_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint auto-resume should read: the one ``work_dir/last_checkpoint`` names;
    if that pointer is empty, unreadable or names a missing file, the newest whole
    checkpoint in ``work_dir`` (with a warning naming the pointer); ``None`` if there is
    neither."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    if not osp.exists(pointer):
        return newest_checkpoint(work_dir)
    try:
        with open(pointer, encoding='utf-8') as f:
            named = f.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        named, problem = '', f'cannot be read ({error})'
    else:
        problem = ('is empty' if not named else
                   f'names {named!r}, which does not exist'
                   if not (osp.isfile(named) or is_sharded_checkpoint(named)) else '')
    if not problem:
        return named
    fallback = newest_checkpoint(work_dir)
    print_log(f'{pointer} {problem}; resuming from the newest whole checkpoint in '
              f'{work_dir}: {fallback}' if fallback else
              f'{pointer} {problem}, and {work_dir} holds no checkpoint: training starts '
              'from scratch', logger='current', level=logging.WARNING)
    return fallback


# --------------------------------------------------------------------- the hook
@HOOKS.register_module()
class FlexCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` with crash-safe writes, weights_only files and
    checks on what is saved and loaded.

    Arguments are those of ``CheckpointHook`` (a misspelled one is an error when the hook
    is built, not at the first save); ``by_epoch`` defaults to False (flexgen trains by
    iteration) and local ``out_dir`` s are written through :class:`AtomicLocalBackend`.

    - Outdated checkpoints are removed after the new one is complete, not before as in
      mmengine; a model with NaN or inf weights is never saved (training stops).
    - Auto-resume reads ``last_checkpoint``; a pointer that is empty or names a missing
      file falls back to the newest whole checkpoint, with a warning.
    - A loaded checkpoint (``load_from``, resume, ``tools/test.py``) must fit the model:
      missing or unexpected keys, other shapes or dtypes, non-finite values are refused,
      all named. ``allow_missing`` (name substrings) lets a ``load_from`` checkpoint lack
      the parameters a fine-tuning re-initialises (FiTv2's high-resolution stage).
    """

    def __init__(self, interval: int = -1, by_epoch: bool = False, *args,
                 backend_args: dict = None, allow_missing=None, **kwargs):
        # CheckpointHook forwards unknown keywords to Runner.save_checkpoint, where they
        # fail only at the first save: refuse them now.
        accepted = [p for p in inspect.signature(CheckpointHook).parameters
                    if p not in ('self', 'args', 'kwargs')] + ['allow_missing']
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            hints = [f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else '')
                     for k in unknown
                     for close in [difflib.get_close_matches(k, accepted, n=1, cutoff=0.6)]]
            raise TypeError(f'FlexCheckpointHook got unknown arguments {", ".join(hints)}; '
                            f'it accepts: {", ".join(accepted)}')
        out_dir = kwargs.get('out_dir')
        local = out_dir is None or '://' not in str(out_dir)
        if backend_args is None and kwargs.get('file_client_args') is None and local:
            backend_args = dict(backend='atomic_local')
        super().__init__(interval, by_epoch, *args, backend_args=backend_args, **kwargs)
        self.allow_missing = (allow_missing,) if isinstance(allow_missing, str) else \
            tuple(allow_missing or ())

    def before_run(self, runner) -> None:
        super().before_run(runner)
        if runner._resume and runner._load_from is None:
            runner._load_from = resolve_last_checkpoint(runner.work_dir)
            if runner._load_from is None:
                runner._resume = False

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if is_main_process() and osp.isdir(self.out_dir):
            # Leftovers of a write that was killed; the file they were meant to become
            # is whole or absent.
            for name in os.listdir(self.out_dir):
                if is_temporary(name):  # a file, or a sharded checkpoint's directory
                    path = osp.join(self.out_dir, name)
                    shutil.rmtree(path) if osp.isdir(path) else os.remove(path)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        weights = [v for key in ('state_dict', 'ema_state_dict')
                   for v in (checkpoint.get(key) or {}).values() if isinstance(v, torch.Tensor)]
        if not all_finite(weights):
            raise FloatingPointError(
                f'Iteration {runner.iter}: the model weights hold NaN or inf values, so no '
                'checkpoint was saved and none was pruned; the previous ones are whole. '
                'Training diverged: lower the learning rate or clip gradients, then resume.')
        dropped = []
        plain = to_plain(checkpoint, dropped=dropped)
        checkpoint.clear()
        checkpoint.update(plain)
        if dropped:
            print_log('Left out of the checkpoint (not storable without pickling code, '
                      f'so it would not load with weights_only=True): {", ".join(dropped)}',
                      logger='current', level=logging.WARNING)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        restore_message_hub(checkpoint)
        if checkpoint.get('sharded') and 'state_dict' not in checkpoint:
            return  # the train state of a sharded checkpoint: its loader checks the shards
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        state = checkpoint.get('state_dict', checkpoint)
        if state and all(k.startswith('module.') for k in state):
            state = {k[len('module.'):]: v for k, v in state.items()}
        expected = model.state_dict()
        if not runner._resume and self.allow_missing:
            expected = {k: v for k, v in expected.items()
                        if k in state or not any(p in k for p in self.allow_missing)}
        problems = weights_problems(expected, state)
        if problems:
            raise CheckpointError(f'{runner._load_from or "the checkpoint"} does not fit the '
                                  f'config\'s model ({type(model).__name__}): '
                                  + '; '.join(problems))

    def _save_checkpoint_with_step(self, runner, step, meta):
        stale = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids
                                            and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                stale.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        consolidate = getattr(getattr(runner.optim_wrapper, 'optimizer', None),
                              'consolidate_state_dict', None)
        if consolidate is not None and not is_main_process():
            # ZeroRedundancyOptimizer: rank 0 gathers the optimizer state inside
            # save_checkpoint, a collective the other ranks join here.
            consolidate()
        runner.save_checkpoint(
            self.out_dir, ckpt_filename, self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta,
            by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
        if not is_main_process():
            return

        # The pointer moves only once the checkpoint it names is complete ...
        atomic_write(self.last_ckpt.encode(), osp.join(runner.work_dir, 'last_checkpoint'))
        # ... and the oldest checkpoint goes only after that.
        for old_step in stale:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old_step))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # DeepSpeed writes directories
                self.file_backend.rmtree(path)
