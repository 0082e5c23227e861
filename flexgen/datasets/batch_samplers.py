"""Batch samplers that decide which images, of which sizes, a training step holds.

Both samplers here:

- are infinite: epoch after epoch, epoch ``e`` in an order drawn from a ``torch.Generator``
  seeded with ``(seed, e)`` (the sampler mmengine wraps only supplies the dataset; its own
  order and rank sharding are not used);
- build one sequence of GLOBAL batches, the same on every rank, and give rank ``r`` its
  part of global batch ``s`` at step ``s``: W ranks together see exactly what one process
  with W times the per-rank budget sees, which makes multi-process runs reproduce
  single-process ones;
- resume without loading a sample: :meth:`set_start_iter` positions the next iteration at
  a global step from the epoch lengths alone.

``dataset.get_size(i) -> (H, W)`` must be cheap: it is called once per index when the
sampler is built.
"""
from typing import Dict, Iterator, List

import numpy as np
import torch
from mmengine.dist import get_dist_info, sync_random_seed
from torch.utils.data import Sampler

from flexgen.registry import DATA_SAMPLERS
from flexgen.rng import keyed_generator

from .packing import best_fit_stream


def _positive_int(owner: str, name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{owner}: {name} must be a positive int, got {value!r}')
    return int(value)


class _GlobalBatchSampler(Sampler):
    """Shared machinery. A subclass gives ``_epoch_length(e)`` (global batches in epoch
    ``e``) and ``_epoch_batches(e)`` (those global batches, each a list of W rank parts)."""

    def __init__(self, sampler, seed=None, shuffle=True):
        self.sampler = sampler
        self.dataset = getattr(sampler, 'dataset', sampler)
        name = type(self).__name__
        if not hasattr(self.dataset, 'get_size'):
            raise TypeError(f'{name}: the dataset {type(self.dataset).__name__} has no '
                            'get_size(index) -> (H, W), which size-aware batching needs')
        self.rank, self.world_size = get_dist_info()
        if seed is None:  # the wrapped sampler's seed (mmengine: the runner's), else a shared one
            seed = getattr(sampler, 'seed', None)
        self.seed = sync_random_seed() if seed is None else int(seed)
        self.shuffle = shuffle
        self.start_iter = 0
        self._hw = [tuple(int(x) for x in self.dataset.get_size(i))
                    for i in range(len(self.dataset))]
        if not self._hw:
            raise ValueError(f'{name}: the dataset is empty')

    # ------------------------------------------------------------ the epoch order
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Dataset indices in the order of epoch ``epoch`` (a permutation if shuffling)."""
        n = len(self._hw)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=keyed_generator(self.seed, epoch))

    def _epoch_length(self, epoch: int) -> int:
        raise NotImplementedError

    def _epoch_batches(self, epoch: int) -> List[List[List[int]]]:
        raise NotImplementedError

    # ------------------------------------------------------------ position and iteration
    def set_start_iter(self, start_iter: int) -> None:
        """Make the next ``__iter__`` start at global step ``start_iter`` (for resuming):
        the position is computed from the epoch lengths, no sample is loaded."""
        if not isinstance(start_iter, (int, np.integer)) or start_iter < 0:
            raise ValueError(f'{type(self).__name__}.set_start_iter: expected a step >= 0, '
                             f'got {start_iter!r}')
        self.start_iter = int(start_iter)

    def set_epoch(self, epoch: int) -> None:
        """A no-op kept for mmengine's loops: epochs are counted inside (the sampler is
        infinite and each epoch's order comes from ``(seed, epoch)``)."""

    def locate(self, step: int):
        """``(epoch, step within that epoch)`` of global step ``step``."""
        epoch = 0
        while True:
            length = self._epoch_length(epoch)
            if length == 0:
                raise ValueError(f'{type(self).__name__}: epoch {epoch} holds no complete '
                                 'global batch')
            if step < length:
                return epoch, step
            step -= length
            epoch += 1

    def __iter__(self) -> Iterator[List[int]]:
        epoch, offset = self.locate(self.start_iter)
        while True:
            for batch in self._epoch_batches(epoch)[offset:]:
                yield batch[self.rank]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        """Batches per rank in one epoch (of epoch 0 where epochs differ)."""
        return self._epoch_length(0)


@DATA_SAMPLERS.register_module()
class BucketBatchSampler(_GlobalBatchSampler):
    """Batches of ``batch_size`` images per rank, all of ONE size (dense, DiT-style steps
    at mixed resolutions and aspect ratios).

    Walking the epoch's order, each image joins the bucket of its size; a bucket that
    reaches ``batch_size * world_size`` images becomes the next global batch, and rank r
    takes images ``[r * batch_size, (r + 1) * batch_size)`` of it. The images left in
    incomplete buckets at the end of the epoch are dropped (as ``drop_last`` does): at
    most ``batch_size * world_size - 1`` per size, see :attr:`num_dropped`. Each epoch
    reshuffles, so it is a different few every epoch.

    Args:
        sampler: the sampler mmengine builds from the dataloader's ``sampler`` config;
            only its ``dataset`` (and ``seed`` when ``seed`` is None) is used.
        batch_size: images per rank and step (mmengine passes the dataloader's).
        seed: the order's seed; None takes the wrapped sampler's seed, else
            ``mmengine.dist.sync_random_seed()`` (the same on every rank).
        shuffle: False walks the dataset in index order every epoch.
    """

    def __init__(self, sampler, batch_size: int, seed=None, shuffle: bool = True):
        super().__init__(sampler, seed, shuffle)
        self.batch_size = _positive_int('BucketBatchSampler', 'batch_size', batch_size)
        self.global_size = self.batch_size * self.world_size
        sizes = sorted(set(self._hw))
        lookup = {hw: k for k, hw in enumerate(sizes)}
        self._size_ids = torch.tensor([lookup[hw] for hw in self._hw])
        counts = torch.bincount(self._size_ids, minlength=len(sizes))
        self.bucket_sizes = dict(zip(sizes, counts.tolist()))
        self._length = int((counts // self.global_size).sum())
        self.num_dropped = int((counts % self.global_size).sum())
        if self._length == 0:
            raise ValueError(f'BucketBatchSampler: no image size has batch_size x world_size = '
                             f'{self.batch_size} x {self.world_size} images; images per size: '
                             f'{self.bucket_sizes}')

    def _epoch_length(self, epoch: int) -> int:
        return self._length

    def _epoch_batches(self, epoch: int) -> List[List[List[int]]]:
        order = self.epoch_order(epoch)
        size_ids, g = self._size_ids[order], self.global_size
        batches, completed_at = [], []
        for k in size_ids.unique().tolist():
            positions = (size_ids == k).nonzero()[:, 0]
            full = len(positions) // g * g
            batches.append(order[positions[:full]].view(-1, g))
            completed_at.append(positions[g - 1:full:g])
        batches = torch.cat(batches)[torch.cat(completed_at).argsort()]
        return batches.view(-1, self.world_size, self.batch_size).tolist()


@DATA_SAMPLERS.register_module()
class TokenBudgetBatchSampler(_GlobalBatchSampler):
    """Each rank's step is a pack of images whose token counts
    ``(H // patch_size) * (W // patch_size)`` sum to at most ``max_tokens`` (NiT-style
    packing; the model sees one jagged batch).

    Packs are filled online, best fit (:func:`flexgen.datasets.packing.best_fit_stream`):
    a buffer holds the next ``buffer_size`` images of the epoch's order; the open pack
    takes the largest buffered image that still fits (the earliest of equal ones), the
    buffer refills from the order, and the pack closes when nothing fits or it holds
    ``batch_size`` images. The pack sequence depends only on ``(seed, epoch)`` and the
    dataset, never on the number of ranks: global step s is packs
    ``[s * W * P, (s + 1) * W * P)`` with W ranks and ``P = packs_per_batch``, and rank r
    takes P consecutive ones. So W ranks with P = 1 see at step s exactly what one process
    with ``packs_per_batch = W`` sees. The packs that do not fill a last global batch of an
    epoch are dropped; :meth:`efficiency` reports how full the packs are. Resuming packs
    every epoch before the resumed one again (about 8 s per epoch of 3.8M images);
    :class:`~flexgen.datasets.pack_samplers.OnlinePackSampler` resumes by arithmetic.

    Args:
        sampler: the sampler mmengine builds from the dataloader's ``sampler`` config;
            only its ``dataset`` (and ``seed`` when ``seed`` is None) is used.
        max_tokens: the token budget of one pack.
        patch_size: pixels (or latent cells) per token along each side.
        batch_size: the most images in one pack; None for no limit. mmengine passes the
            dataloader's ``batch_size`` here unless the batch sampler config sets it.
        seed, shuffle: as in :class:`BucketBatchSampler`.
        buffer_size: how many upcoming images the packer may choose from.
        packs_per_batch: packs per rank and step (P above).

    Raises:
        ValueError: when the sampler is built, if an image alone exceeds ``max_tokens``.
    """

    def __init__(self, sampler, max_tokens: int, patch_size: int = 1, batch_size=None,
                 seed=None, shuffle: bool = True, buffer_size: int = 256,
                 packs_per_batch: int = 1):
        super().__init__(sampler, seed, shuffle)
        name = 'TokenBudgetBatchSampler'
        self.max_tokens = _positive_int(name, 'max_tokens', max_tokens)
        self.patch_size = _positive_int(name, 'patch_size', patch_size)
        self.batch_size = _positive_int(name, 'batch_size', batch_size, allow_none=True)
        self.buffer_size = _positive_int(name, 'buffer_size', buffer_size)
        self.packs_per_batch = _positive_int(name, 'packs_per_batch', packs_per_batch)
        p = self.patch_size
        self._tokens = [(h // p) * (w // p) for h, w in self._hw]
        too_large = [i for i, n in enumerate(self._tokens) if n > self.max_tokens]
        if too_large:
            i = too_large[0]
            raise ValueError(f'{name}: dataset index {i} of size {self._hw[i]} has '
                             f'{self._tokens[i]} tokens (patch_size {p}), more than the budget '
                             f'max_tokens={self.max_tokens} ({len(too_large)} of {len(self._hw)} '
                             'images exceed it); raise max_tokens or leave those images out')
        if min(self._tokens) == 0:
            i = self._tokens.index(0)
            raise ValueError(f'{name}: dataset index {i} of size {self._hw[i]} is smaller than '
                             f'one patch of {p} x {p}')
        self._lengths: Dict[int, int] = {}
        self._packs_cache = (None, None)
        if self._epoch_length(0) == 0:
            raise ValueError(f'{name}: epoch 0 packs into fewer than world_size x '
                             f'packs_per_batch = {self.world_size * self.packs_per_batch} packs')

    def epoch_packs(self, epoch: int) -> List[List[int]]:
        """Every pack of epoch ``epoch``, in order (before dropping the incomplete
        global batch at the end)."""
        if self._packs_cache[0] == epoch:
            return self._packs_cache[1]
        packs = best_fit_stream(self.epoch_order(epoch).tolist(), self._tokens,
                                self.max_tokens, self.buffer_size, self.batch_size)
        self._packs_cache = (epoch, packs)
        return packs

    def _epoch_length(self, epoch: int) -> int:
        if epoch not in self._lengths:
            per_step = self.world_size * self.packs_per_batch
            self._lengths[epoch] = len(self.epoch_packs(epoch)) // per_step
        return self._lengths[epoch]

    def _epoch_batches(self, epoch: int) -> List[List[List[int]]]:
        packs, p = self.epoch_packs(epoch), self.packs_per_batch
        batches = []
        for s in range(self._epoch_length(epoch)):
            step = packs[s * self.world_size * p:(s + 1) * self.world_size * p]
            batches.append([[i for pack in step[r * p:(r + 1) * p] for i in pack]
                            for r in range(self.world_size)])
        return batches

    def efficiency(self, epoch: int = 0) -> float:
        """Tokens used over tokens budgeted, over the packs epoch ``epoch`` keeps."""
        kept = self._epoch_length(epoch) * self.world_size * self.packs_per_batch
        packs = self.epoch_packs(epoch)[:kept]
        used = sum(self._tokens[i] for pack in packs for i in pack)
        return used / (len(packs) * self.max_tokens)
