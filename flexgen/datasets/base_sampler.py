"""What a flexgen data sampler is: one infinite sequence of global steps, the same on every
rank, of which each rank takes its part."""
import logging
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from mmengine.dist import get_dist_info, sync_random_seed
from mmengine.logging import print_log
from torch.utils.data import Sampler

from flexgen.rng import keyed_generator

from .packing.lengths import dataset_sizes, dataset_token_counts, find_oversize


def positive_int(owner: str, name: str, value, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int, or a ValueError naming ``owner`` and the argument ``name``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{owner}: {name} must be a positive int, got {value!r}')
    return int(value)


def refuse_unknown(owner: str, kwargs: dict, renamed: Dict[str, str]) -> None:
    """A TypeError for arguments a callable does not take: a renamed one names its new
    name, anything else reads as Python's own "unexpected keyword argument"."""
    for key in kwargs:
        if key in renamed:
            raise TypeError(f'{owner}: {key!r} is now called {renamed[key]!r} (one name per '
                            'knob across the data samplers and the collate)')
        raise TypeError(f"{owner}() got an unexpected keyword argument '{key}'")


class GlobalBatchSampler(Sampler):
    """Base class of flexgen's data samplers (the dataloader's ``batch_sampler``).

    A data sampler builds ONE infinite sequence of global steps, epoch after epoch, the
    same on every rank. A global step is ``W * P`` groups of dataset indices (W ranks, P
    groups per rank; a group is a pack, or a bucket's batch), and rank ``r`` takes groups
    ``[r * P, (r + 1) * P)``, concatenated, as its step. So W ranks together see exactly
    what one process sees with ``W * P`` groups per step: multi-process runs reproduce
    single-process ones. Every order is a pure function of the seed and the epoch
    (:meth:`epoch_permutation`), and :meth:`set_start_iter` places the next iteration at a
    global step without loading a sample (``FlexTrainLoop`` calls it on resume).

    A subclass sets :attr:`groups_per_rank` (P) and implements :meth:`global_steps` and
    ``__len__`` (steps in one epoch). The packing samplers share :meth:`resolve_packs_per_step`,
    :meth:`token_counts` and :meth:`leave_out_oversize`.

    Args:
        sampler: the sampler mmengine builds from the dataloader's ``sampler`` config;
            only its ``dataset`` (and ``seed`` when ``seed`` is None) is used.
        seed: the orders' seed; None takes the wrapped sampler's seed (mmengine: the
            runner's), else ``mmengine.dist.sync_random_seed()`` (the same on every rank).
        shuffle: False walks the dataset in index order every epoch.
    """

    groups_per_rank = 1

    def __init__(self, sampler, seed: Optional[int] = None, shuffle: bool = True):
        self.sampler = sampler  # mmengine's seed hook reads batch_sampler.sampler
        self.dataset = getattr(sampler, 'dataset', sampler)
        self.rank, self.world_size = get_dist_info()
        if seed is None:
            seed = getattr(sampler, 'seed', None)
        self.seed = sync_random_seed() if seed is None else int(seed)
        self.shuffle = shuffle
        self.start_iter = 0
        self.num_oversize = 0

    # ------------------------------------------------------------ what a subclass gives
    def global_steps(self, start: int) -> Iterator[List[List[int]]]:
        """The global steps from step ``start`` on, forever: each a list of
        ``world_size * groups_per_rank`` groups (lists of dataset indices), rank-major."""
        raise NotImplementedError

    def __len__(self) -> int:
        """Steps in one epoch."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared pieces
    def epoch_permutation(self, epoch: int, n: int) -> torch.Tensor:
        """``0 .. n - 1`` in the order of epoch ``epoch``: drawn from ``(seed, epoch)``, or
        in order without shuffling."""
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=keyed_generator(self.seed, epoch))

    def dataset_sizes(self) -> List[tuple]:
        """``(H, W)`` of every dataset index (``dataset.get_size``)."""
        return dataset_sizes(self.dataset, type(self).__name__)

    def token_counts(self, patch_size: int) -> np.ndarray:
        """Tokens ``(H // p) * (W // p)`` of every dataset index."""
        return dataset_token_counts(self.dataset, patch_size, type(self).__name__)

    def resolve_packs_per_step(self, packs_per_step: Optional[int],
                               batch_size: Optional[int]) -> int:
        """Packs per rank and step: ``packs_per_step``, else the dataloader's ``batch_size``
        (NiT's "packs per device", which mmengine passes to every batch sampler), else 1."""
        name = type(self).__name__
        if packs_per_step is None:
            packs_per_step = 1 if batch_size is None else batch_size
        elif batch_size not in (None, 1, packs_per_step):
            raise ValueError(f'{name}: packs_per_step={packs_per_step} but the dataloader '
                             f'batch_size={batch_size}; a step holds packs_per_step packs per '
                             'rank: set batch_size=None (or the same value)')
        return positive_int(name, 'packs_per_step', packs_per_step)

    def leave_out_oversize(self, tokens: np.ndarray, max_tokens: int, oversize: str,
                           patch_size: int) -> np.ndarray:
        """Indices over the budget: an error naming the first (``oversize='error'``), or
        (``'drop'``) counted in :attr:`num_oversize`, logged and returned."""
        name = type(self).__name__
        over = find_oversize(
            tokens, max_tokens, oversize, name,
            describe=lambda i: (f'dataset index {i} of size {tuple(self.dataset.get_size(i))} '
                                f'has {int(tokens[i])} tokens (patch_size {patch_size})'),
            budget=f'the budget max_tokens={max_tokens}',
            remedy="raise max_tokens, resize them in the dataset, or set oversize='drop'")
        if len(over):
            self.num_oversize = len(over)
            print_log(f'{name}: left out {len(over)} of {len(tokens)} images with more than '
                      f"max_tokens={max_tokens} tokens (oversize='drop'), e.g. index "
                      f'{int(over[0])} with {int(tokens[over[0]])} tokens', logger='current',
                      level=logging.WARNING)
        return over

    # ------------------------------------------------------------ position and iteration
    def set_start_iter(self, start_iter: int) -> None:
        """Make the next ``__iter__`` start at global step ``start_iter`` (for resuming):
        the position is computed, no sample is loaded."""
        if not isinstance(start_iter, (int, np.integer)) or start_iter < 0:
            raise ValueError(f'{type(self).__name__}.set_start_iter: expected a step >= 0, '
                             f'got {start_iter!r}')
        self.start_iter = int(start_iter)

    def set_epoch(self, epoch: int) -> None:
        """A no-op kept for mmengine's loops: epochs are counted inside (the sampler is
        infinite and each epoch's order comes from the seed and the epoch)."""

    def rank_groups(self, groups: List[List[int]]) -> List[List[int]]:
        """This rank's ``groups_per_rank`` groups of a global step."""
        p = self.groups_per_rank
        return groups[self.rank * p:(self.rank + 1) * p]

    def __iter__(self) -> Iterator[List[int]]:
        for groups in self.global_steps(self.start_iter):
            yield [i for group in self.rank_groups(groups) for i in group]
