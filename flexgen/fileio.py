"""Files that survive a kill, and checkpoints that never run code when read.

The one place flexgen writes a file atomically and reads a checkpoint:

- :func:`atomic_write` / :func:`atomic_path`: the file holds its old content or all of
  the new one, whatever happens during the write (temporary file in the same directory,
  fsync, ``os.replace``, fsync of the directory).
- :func:`read_checkpoint`: safetensors, or ``torch.load(weights_only=True)``; errors name
  the file and what is wrong with it, and never advise turning the safety off.
- :func:`select_weights`: the model weights inside any checkpoint layout flexgen meets
  (mmengine's with or without ``EMAHook``, the references' ``{'ema', 'model'}``, a plain
  state dict), EMA or raw as asked.
- :func:`weights_problems`: why a state dict does not fit a module (keys, shapes, dtypes,
  non-finite values), so that loaders refuse instead of loading a mismatch silently.
"""
import argparse
import contextlib
import logging
import math
import os
import os.path as osp
import pickle
import re
import uuid
import zipfile
from typing import Dict, List, Tuple

import torch

TMP_SUFFIX = '.tmp'

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------- atomic files
def _write(f, data: bytes) -> None:
    """The one place bytes reach an atomically written file (tests interrupt it to
    simulate a kill)."""
    f.write(data)


def _tmp_name(filepath: str) -> str:
    directory, name = osp.split(filepath)
    return osp.join(directory, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}')


def _fsync_directory(directory: str) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(filepath):
    """A temporary path next to ``filepath`` for a writer that takes a file name
    (``safetensors.torch.save_file``, ``np.savez``, ``PIL.Image.save``); on success it is
    fsync'ed and renamed over ``filepath``, on any error removed::

        with atomic_path('model.safetensors') as tmp:
            save_file(tensors, tmp)
    """
    filepath = osp.abspath(os.fspath(filepath))
    directory = osp.dirname(filepath)
    os.makedirs(directory, exist_ok=True)
    tmp = _tmp_name(filepath)
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def atomic_write(data: bytes, filepath) -> None:
    """Write ``data`` to ``filepath`` so that it holds either its old content or all of
    ``data``, whatever happens (kill, power loss, full disk) during the write."""
    with atomic_path(filepath) as tmp:
        with open(tmp, 'xb') as f:
            _write(f, data)
            f.flush()


def is_temporary(name: str) -> bool:
    """Whether a file name is a leftover of an :func:`atomic_path` write that was killed."""
    return name.startswith('.') and name.endswith(TMP_SUFFIX)


# --------------------------------------------------------------------- reading
class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read safely, or whose weights do not fit."""


def _refusal(path: str, error: Exception) -> CheckpointError:
    found = re.search(r'GLOBAL ([\w.]+)', str(error))
    what = f' (it needs {found.group(1)})' if found else ''
    return CheckpointError(
        f'{path} holds pickled Python objects beyond tensors, plain containers and '
        f'argparse.Namespace{what}, so it was not loaded: flexgen never runs code from a '
        'checkpoint file. Checkpoints written by flexgen load; for another file, save its '
        'tensors (e.g. its state dict) as safetensors from a trusted session.')


def read_checkpoint(path: str, lazy: bool = False, map_location='cpu') -> dict:
    """The contents of a checkpoint file, loaded without running pickled code.

    ``.safetensors`` through safetensors; anything else through
    ``torch.load(weights_only=True)``, with ``argparse.Namespace`` allowed (the references'
    training checkpoints store their command line as ``args``: plain values, no code).
    ``lazy=True`` memory-maps the tensors (cheap, to look at keys and shapes).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated or corrupt, or holds pickled objects that
            would run code (named, never loaded).
    """
    path = osp.expanduser(os.fspath(path))
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device=str(map_location) if isinstance(
                map_location, (str, torch.device)) else 'cpu')
        except SafetensorError as error:
            raise CheckpointError(f'{path} is not a readable safetensors file (truncated or '
                                  f'corrupt): {error}') from error
    if osp.getsize(path) == 0:
        raise CheckpointError(f'{path} is empty (0 bytes): not a checkpoint')
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            # legacy (non-zip) files cannot be memory-mapped
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=lazy and zipfile.is_zipfile(path))
        except pickle.UnpicklingError as error:
            if 'weights' in str(error).lower() and 'only' in str(error).lower():
                raise _refusal(path, error) from None
            raise CheckpointError(f'{path} is not a readable checkpoint (truncated or '
                                  f'corrupt): {str(error).splitlines()[0]}') from None
        except PermissionError:
            raise
        except (RuntimeError, EOFError, KeyError, ValueError, OSError,
                zipfile.BadZipFile) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f'{path} is not a readable checkpoint (truncated or '
                                  f'corrupt, or not written by torch.save): {reason}') from None


# --------------------------------------------------------------------- which weights
def _strip_module(state: dict) -> dict:
    if state and all(k.startswith('module.') for k in state):
        return {k[len('module.'):]: v for k, v in state.items()}
    return state


def select_weights(checkpoint: dict, use_ema: bool = True,
                   where: str = 'the checkpoint') -> Tuple[Dict[str, torch.Tensor], str]:
    """The model weights in a checkpoint, EMA or raw, and which ones they are.

    Layouts:

    - mmengine's Runner with ``EMAHook``: the hook *swaps* the two state dicts when it
      saves, so ``state_dict`` holds the EMA weights and ``ema_state_dict`` (keys
      ``module.*`` plus ``steps``) the raw ones (``EMAHook._swap_ema_state_dict``);
    - mmengine's Runner without EMA: ``state_dict`` (raw);
    - the references' training checkpoints: ``{'ema': ..., 'model': ...}``;
    - a plain state dict (a released file, a safetensors file): returned as is.

    A ``module.`` prefix (DDP) is removed.

    Returns:
        ``(state_dict, kind)`` with ``kind`` one of ``'ema'``, ``'raw'`` or ``'as saved'``
        (a plain state dict: whatever its author saved).

    EMA asked of a checkpoint that has none gives its raw weights with a logged warning
    (they are the only ones there).
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{where} is a {type(checkpoint).__name__}, not a checkpoint '
                              'dict')
    if isinstance(checkpoint.get('state_dict'), dict):  # mmengine's Runner
        if 'ema_state_dict' in checkpoint:
            if use_ema:
                return _strip_module(checkpoint['state_dict']), 'ema'
            raw = {k[len('module.'):]: v for k, v in checkpoint['ema_state_dict'].items()
                   if k.startswith('module.')}
            return raw, 'raw'
        if use_ema:
            logger.warning('%s was trained without EMAHook: it holds raw weights only, '
                           'which are used', where)
        return _strip_module(checkpoint['state_dict']), 'raw'
    order = ('ema', 'model') if use_ema else ('model', 'ema')
    for key in order:
        if isinstance(checkpoint.get(key), dict):
            if key != order[0]:
                logger.warning("%s has no '%s' weights: its '%s' weights are used", where,
                               order[0], key)
            return _strip_module(checkpoint[key]), 'ema' if key == 'ema' else 'raw'
    return _strip_module(checkpoint), 'as saved'


# --------------------------------------------------------------------- checking
def weights_problems(expected: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor],
                     limit: int = 8) -> List[str]:
    """Why ``state`` does not fit a module whose own state dict is ``expected``: missing
    and unexpected keys, shape mismatches, a floating tensor stored as integers (or the
    reverse), non-finite values. Empty when it fits."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))

    def listed(names):
        return ', '.join(names[:limit]) + (f' (+{len(names) - limit} more)'
                                          if len(names) > limit else '')

    if missing:
        problems.append(f'missing keys: {listed(missing)}')
    if unexpected:
        problems.append(f'unexpected keys: {listed(unexpected)}')
    shapes, kinds, nonfinite = [], [], []
    for key in sorted(set(expected) & set(state)):
        want, got = expected[key], state[key]
        if not isinstance(got, torch.Tensor):
            kinds.append(f'{key} is a {type(got).__name__}')
            continue
        if tuple(want.shape) != tuple(got.shape):
            shapes.append(f'{key} {tuple(got.shape)} != {tuple(want.shape)}')
        elif want.is_floating_point() != got.is_floating_point():
            kinds.append(f'{key} is {got.dtype}, the model needs {want.dtype}')
        elif got.is_floating_point() and got.numel() and not torch.isfinite(got).all():
            nonfinite.append(key)
    if shapes:
        problems.append(f'shape mismatches: {listed(shapes)}')
    if kinds:
        problems.append(f'dtype mismatches: {listed(kinds)}')
    if nonfinite:
        problems.append(f'non-finite values (NaN or inf) in: {listed(nonfinite)}')
    return problems


def load_checked(module: torch.nn.Module, state: Dict[str, torch.Tensor],
                 where: str) -> None:
    """``module.load_state_dict(state)`` after :func:`weights_problems` found nothing;
    otherwise a :class:`CheckpointError` naming ``where`` and every problem."""
    problems = weights_problems(module.state_dict(), state)
    if problems:
        raise CheckpointError(f'{where} does not fit {type(module).__name__}: '
                              + '; '.join(problems))
    module.load_state_dict(state, strict=True)


def all_finite(tensors) -> bool:
    """Whether every floating tensor of an iterable is free of NaN and inf (one host
    sync for all of them)."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return True
    norms = torch._foreach_norm(floats, math.inf)
    device = norms[0].device
    return bool(torch.isfinite(torch.stack([n.float().to(device) for n in norms])).all())
