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
import logging
import os
import os.path as osp
import uuid
from collections import OrderedDict

import numpy as np
import torch
from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner import CheckpointLoader

from flexgen.registry import HOOKS

TMP_SUFFIX = '.tmp'
_HISTORY_BUFFER = 'HistoryBuffer'
_PLAIN_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype,
                  torch.device, torch.Size)


# --------------------------------------------------------------------- atomic files
def _write(f, data: bytes) -> None:
    """The one place bytes reach a checkpoint file (tests interrupt it to simulate a kill)."""
    f.write(data)


def atomic_write(data, filepath) -> None:
    """Write ``data`` to ``filepath`` so that it holds either its old content or all of
    ``data``, whatever happens (kill, power loss) during the write.

    ``data`` is bytes, or a function that writes the content into the binary file object it
    is given (for files too large to assemble in memory first).
    """
    filepath = osp.abspath(os.fspath(filepath))
    directory = osp.dirname(filepath)
    os.makedirs(directory, exist_ok=True)
    tmp = osp.join(directory,
                   f'.{osp.basename(filepath)}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}')
    try:
        with open(tmp, 'xb') as f:
            if callable(data):
                data(f)
            else:
                _write(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    # Make the rename itself durable: the directory entry must reach the disk too.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """mmengine's loader for local files, with ``weights_only=True`` stated explicitly (so
    no environment variable or torch default can turn it off) and an error that says why
    an old-style checkpoint is refused."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except Exception as error:
        if 'weights_only' not in str(error).lower() and 'weights only' not in str(error).lower():
            raise
        raise RuntimeError(
            f'{filename} holds pickled Python objects beyond tensors and plain containers, '
            'so it was not loaded: flexgen loads checkpoints with weights_only=True and '
            'never runs code from a file. Checkpoints written by FlexCheckpointHook load; '
            'for another file, re-save its tensors (e.g. its state_dict) from a trusted '
            f'session. torch said: {str(error).splitlines()[0]}') from error


# --------------------------------------------------------------------- the hook
@HOOKS.register_module()
class FlexCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` with crash-safe writes and weights_only files.

    Arguments are those of ``CheckpointHook``; ``by_epoch`` defaults to False (flexgen
    trains by iteration) and local ``out_dir`` s are written through
    :class:`AtomicLocalBackend`. Outdated checkpoints are removed after the new one is
    complete, not before as in mmengine.
    """

    def __init__(self, interval: int = -1, by_epoch: bool = False, *args,
                 backend_args: dict = None, **kwargs):
        out_dir = kwargs.get('out_dir')
        local = out_dir is None or '://' not in str(out_dir)
        if backend_args is None and kwargs.get('file_client_args') is None and local:
            backend_args = dict(backend='atomic_local')
        super().__init__(interval, by_epoch, *args, backend_args=backend_args, **kwargs)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if is_main_process() and osp.isdir(self.out_dir):
            # Leftovers of a write that was killed; the file they were meant to become
            # is whole or absent.
            for name in os.listdir(self.out_dir):
                if name.startswith('.') and name.endswith(TMP_SUFFIX):
                    os.remove(osp.join(self.out_dir, name))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
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
