"""Sharded training checkpoints: every rank writes its own shards, nothing is pickled.

A sharded checkpoint is a directory (named like a single-file one, e.g. ``iter_4000.pth``)::

    shard-00001-model-00001-of-00001.safetensors   rank 0's shards
    shard-00002-model-00001-of-00001.safetensors   rank 1's shards ...
    train_state.pth                                meta, message hub, schedulers, optimizer
                                                   hyper-parameters (weights_only, rank 0)

The tensors (``model.*``, ``optimizer.state.*``, ``ema.module.*``, ``ema.steps``) go
through ``torch.distributed.checkpoint`` (DCP) with its safetensors storage
(``HuggingFaceStorageWriter(save_distributed=True)``): each rank writes the shards it
holds, with their offsets in the file's JSON header, and loading reshards to any world
size (1 included, no process group). DCP's default file storage is not used: its
``.metadata`` file is a pickle that ``pickle.load`` reads (code runs on load), and it stores
non-tensor values with ``torch.save`` and loads them with ``weights_only=False``. The
safetensors storage keeps its metadata in the safetensors headers, so reading a checkpoint
parses JSON and raw tensor bytes only; ``train_state.pth`` loads with
``torch.load(weights_only=True)`` (``flexgen.fileio.read_checkpoint``).

Writes are atomic as a whole: the shards and the train state go to a temporary directory
``.<name>.tmp`` beside the target, which is renamed to ``<name>`` once every rank has
finished (and fsync'ed) its files. A kill at any earlier point leaves the previous
checkpoint, and the ``last_checkpoint`` pointer to it, untouched; the leftover temporary
directory is removed when training starts again. Every rank writes into the same
directory, so on several nodes the work directory must be on a file system they share (as
for any DCP checkpoint).
"""
import io
import os
import os.path as osp
import shutil
import warnings
from contextlib import contextmanager
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist

from flexgen.fileio import TMP_SUFFIX, _fsync_directory, atomic_write, read_checkpoint

TRAIN_STATE = 'train_state.pth'
SHARD_SUFFIX = '.safetensors'


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextmanager
def _dcp_quietly():
    """DCP warns on every single-process save / load that it assumes one process; here
    one process is meant (a one-process run of a sharded config, consolidation)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        yield


def is_sharded_checkpoint(path) -> bool:
    """Whether ``path`` is a sharded checkpoint directory."""
    return osp.isdir(path) and osp.isfile(osp.join(path, TRAIN_STATE))


def temporary_path(path: str, kind: str = '') -> str:
    """Where the checkpoint ``path`` is written before it is renamed into place (the same
    on every rank; a name ``flexgen.fileio.is_temporary`` recognises)."""
    path = osp.abspath(path)
    return osp.join(osp.dirname(path), f'.{osp.basename(path)}{kind}{TMP_SUFFIX}')


def _commit(tmp: str, path: str) -> None:
    """Rename the finished ``tmp`` directory to ``path`` (rank 0)."""
    if osp.exists(path):  # the same name saved again: set the old one aside first
        old = temporary_path(path, '.old')
        if osp.exists(old):
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    _fsync_directory(osp.dirname(path))


def save_sharded(path: str, states: dict, train_state: dict) -> None:
    """Write a sharded checkpoint; a collective: every rank calls it with its own shards.

    Args:
        path: the checkpoint directory to create (replaced if it exists).
        states: what DCP saves, e.g. ``{'model': {...}, 'optimizer': {'state': {...}},
            'ema': ShardedEMA}``: nested dicts of tensors / DTensors, or objects with
            ``state_dict()`` (DCP's ``Stateful``). Only tensors: a non-tensor value is an
            error (it would be pickled).
        train_state: the small plain state rank 0 writes as ``train_state.pth``
            (tensors, containers and scalars only: it loads with ``weights_only=True``).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    path = osp.abspath(path)
    tmp = temporary_path(path)
    if _rank() == 0:
        if osp.exists(tmp):  # left by a killed write
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()
    plain = {key: value.state_dict() if hasattr(value, 'state_dict') else value
             for key, value in states.items()}
    _check_tensors_only(plain)
    with _dcp_quietly():
        dcp.save(plain, storage_writer=HuggingFaceStorageWriter(tmp, save_distributed=True),
                 no_dist=not _distributed())
    if _rank() == 0:
        buffer = io.BytesIO()
        torch.save(train_state, buffer)
        atomic_write(buffer.getvalue(), osp.join(tmp, TRAIN_STATE))
        _commit(tmp, path)
    _barrier()


def _check_tensors_only(state, prefix: str = '') -> None:
    for key, value in state.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            _check_tensors_only(value, f'{name}.')
        elif not isinstance(value, torch.Tensor):
            raise TypeError(f'sharded checkpoint: {name} is a {type(value).__name__}; only '
                            'tensors are stored in shards (plain values go to the train state)')


def _reader(path: str):
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f'{path} is not a sharded checkpoint (a directory with '
                                f'{TRAIN_STATE} and *{SHARD_SUFFIX} shards)')
    return HuggingFaceStorageReader(path)


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, minus the one path that unpickles (``torch.load(weights_only=
        False)`` of a stored non-tensor value), which safetensors shards never take."""

        def load_bytes(self, read_item, value):
            raise ValueError(f'sharded checkpoint: {read_item.dest_index.fqn} is not a tensor; '
                             'refusing to unpickle it')

    return TensorsOnlyLoadPlanner()


def sharded_keys(path: str) -> Dict[str, tuple]:
    """Every tensor of a sharded checkpoint: ``{key: (shape, dtype)}`` (headers only)."""
    metadata = _reader(path).read_metadata()
    return {key: (tuple(md.size), md.properties.dtype)
            for key, md in metadata.state_dict_metadata.items()}


def load_sharded(path: str, states: dict) -> None:
    """Load ``states`` (the structure given to :func:`save_sharded`, any sharding, any
    subset of the saved keys) in place from the checkpoint ``path``; a collective when a
    process group exists. ``Stateful`` objects get ``load_state_dict`` afterwards."""
    import torch.distributed.checkpoint as dcp
    with _dcp_quietly():
        dcp.load(states, storage_reader=_reader(path), planner=_planner(),
                 no_dist=not _distributed())


def read_train_state(path: str) -> dict:
    """The plain part of a sharded checkpoint (``weights_only=True``: no code runs)."""
    _reader(path)  # the error for a directory that is not a sharded checkpoint
    return read_checkpoint(osp.join(path, TRAIN_STATE))


def load_full_tensors(path: str, prefix: str, skip: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` (e.g. ``'ema.module.'``), whole, on the CPU, keyed
    without the prefix, read in this process alone (no process group needed)."""
    import torch.distributed.checkpoint as dcp
    keys = {key: spec for key, spec in sharded_keys(path).items()
            if key.startswith(prefix) and key[len(prefix):] not in set(skip)}
    state = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in keys.items()}
    if state:
        with _dcp_quietly():
            dcp.load(state, storage_reader=_reader(path), planner=_planner(), no_dist=True)
    return {key[len(prefix):]: value for key, value in state.items()}


def consolidate(path: str, weights: str = 'ema', dtype: Optional[torch.dtype] = None
                ) -> Dict[str, torch.Tensor]:
    """The full generator weights of a sharded checkpoint, with the generator's own keys
    (``backbone.*``): ``weights='ema'`` (the exponential moving average; an error if the
    run kept none) or ``'model'`` (the trained weights)."""
    if weights not in ('ema', 'model'):
        raise ValueError(f"consolidate: weights must be 'ema' or 'model', got {weights!r}")
    prefix = 'ema.module.' if weights == 'ema' else 'model.'
    tensors = load_full_tensors(path, prefix)
    if not tensors:
        found = sorted({key.split('.')[0] for key in sharded_keys(path)})
        raise KeyError(f'{path} holds no {weights!r} weights (it has: {", ".join(found)}); '
                       + ("the run kept no EMA (FlexEMAHook): take weights='model'"
                          if weights == 'ema' else ''))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors
