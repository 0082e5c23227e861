"""Batch samplers that decide how many images of which sizes a step holds.

Both are infinite (epoch after epoch, each reshuffled from ``(seed, epoch)``), shard a
sequence of GLOBAL batches across ranks (rank r takes its part of global batch s, so
DDP over W ranks sees exactly what one process would see at the global batch), and resume
at any step with :meth:`set_start_iter` without loading a single sample.
"""
from collections import defaultdict

import torch
from mmengine.dist import get_dist_info, sync_random_seed
from torch.utils.data import Sampler

from flexgen.registry import DATA_SAMPLERS


class _GlobalBatchSampler(Sampler):
    """Shared machinery: subclasses implement ``global_batches(epoch)``."""

    def __init__(self, sampler, seed=None, shuffle=True):
        self.dataset = sampler.dataset if hasattr(sampler, 'dataset') else sampler
        if not hasattr(self.dataset, 'get_size'):
            raise TypeError(f'{type(self).__name__}: dataset {type(self.dataset).__name__} has '
                            'no get_size(index); size-aware batching needs it')
        self.rank, self.world_size = get_dist_info()
        self.seed = sync_random_seed() if seed is None else seed
        self.shuffle = shuffle
        self.start_iter = 0
        self._sizes = [tuple(self.dataset.get_size(i)) for i in range(len(self.dataset))]

    def order(self, epoch):
        if not self.shuffle:
            return list(range(len(self._sizes)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self._sizes), generator=g).tolist()

    def global_batches(self, epoch):
        raise NotImplementedError

    def rank_part(self, global_batch):
        raise NotImplementedError

    def set_start_iter(self, iteration):
        """The next ``__iter__`` starts at global step ``iteration``."""
        self.start_iter = int(iteration)

    def set_epoch(self, epoch):
        """Epochs are internal (the sampler is infinite); kept for mmengine's loops."""

    def __iter__(self):
        epoch, skip = 0, self.start_iter
        while True:
            batches = self.global_batches(epoch)
            if not batches:
                raise ValueError(f'{type(self).__name__}: an epoch holds no complete batch')
            if skip >= len(batches):
                skip -= len(batches)
            else:
                for batch in batches[skip:]:
                    yield self.rank_part(batch)
                skip = 0
            epoch += 1

    def __len__(self):
        return len(self.global_batches(0))


@DATA_SAMPLERS.register_module()
class BucketBatchSampler(_GlobalBatchSampler):
    """Batches of ``batch_size`` images per rank, all of ONE size (DiT-style dense
    batches at mixed resolutions). Per epoch, each size bucket is cut into global batches
    of ``batch_size * world_size``; the remainder of each bucket is left out of that epoch
    (a different remainder every epoch, since each epoch reshuffles)."""

    def __init__(self, sampler, batch_size, seed=None, shuffle=True):
        super().__init__(sampler, seed, shuffle)
        self.batch_size = batch_size
        self.global_size = batch_size * self.world_size

    def global_batches(self, epoch):
        buckets = defaultdict(list)
        for index in self.order(epoch):
            buckets[self._sizes[index]].append(index)
        batches = [bucket[i:i + self.global_size]
                   for _, bucket in sorted(buckets.items())
                   for i in range(0, len(bucket) - self.global_size + 1, self.global_size)]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 50_000)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def rank_part(self, global_batch):
        return global_batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]


@DATA_SAMPLERS.register_module()
class TokenBudgetBatchSampler(_GlobalBatchSampler):
    """Each rank's batch is a pack of images whose token counts
    (``(H // patch_size) * (W // patch_size)``) sum to at most ``max_tokens``.

    Packs are filled online from a buffer of the next ``buffer_size`` images of the
    shuffled order: the open pack takes the largest buffered image that still fits, and
    closes when none does. Global step s is packs ``[s*W, (s+1)*W)``; rank r takes one.
    """

    def __init__(self, sampler, max_tokens, patch_size=1, batch_size=None, seed=None,
                 shuffle=True, buffer_size=64):
        super().__init__(sampler, seed, shuffle)
        self.max_tokens, self.max_images, self.buffer_size = max_tokens, batch_size, buffer_size
        self._tokens = [(h // patch_size) * (w // patch_size) for h, w in self._sizes]
        too_large = [i for i, n in enumerate(self._tokens) if n > max_tokens]
        if too_large:
            i = too_large[0]
            raise ValueError(f'TokenBudgetBatchSampler: {len(too_large)} images exceed the budget '
                             f'of {max_tokens} tokens, e.g. index {i} of size {self._sizes[i]} '
                             f'({self._tokens[i]} tokens); raise max_tokens or resize them')
        self._cache = {}

    def packs(self, epoch):
        order, buffer, packs = self.order(epoch), [], []
        position = 0
        while position < len(order) or buffer:
            while len(buffer) < self.buffer_size and position < len(order):
                buffer.append(order[position])
                position += 1
            pack, room = [], self.max_tokens
            while buffer and (self.max_images is None or len(pack) < self.max_images):
                fits = [j for j, i in enumerate(buffer) if self._tokens[i] <= room]
                if not fits:
                    break
                j = max(fits, key=lambda j: self._tokens[buffer[j]])
                room -= self._tokens[buffer[j]]
                pack.append(buffer.pop(j))
                if position < len(order):
                    buffer.append(order[position])
                    position += 1
            packs.append(pack)
        return packs

    def global_batches(self, epoch):
        if epoch not in self._cache:
            self._cache = {epoch: self.packs(epoch)}  # only the current epoch is kept
        packs = self._cache[epoch]
        w = self.world_size
        return [packs[i:i + w] for i in range(0, len(packs) - w + 1, w)]

    def rank_part(self, global_batch):
        return global_batch[self.rank]

    def efficiency(self, epoch=0):
        """Real tokens over budget, averaged over the packs of an epoch."""
        packs = self.packs(epoch)
        used = sum(self._tokens[i] for pack in packs for i in pack)
        return used / (len(packs) * self.max_tokens)
