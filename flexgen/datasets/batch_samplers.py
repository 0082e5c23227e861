"""Data samplers that decide which images, of which sizes, a training step holds, epoch by
epoch (:class:`~flexgen.datasets.base_sampler.GlobalBatchSampler` says what every data
sampler shares: one sequence of global steps for all ranks, keyed orders, resume by
position).

Here each epoch's global steps are built from the epoch's order at once, and resuming
finds the epoch of a step from the epoch lengths. ``dataset.get_size(i) -> (H, W)`` must be
cheap: it is called once per index when the sampler is built.
"""
from typing import Dict, Iterator, List

import torch

from flexgen.registry import DATA_SAMPLERS

from .base_sampler import GlobalBatchSampler, positive_int
from .packing.lengths import kept_mask
from .packing.online import best_fit_stream


class _EpochSampler(GlobalBatchSampler):
    """A subclass gives ``_epoch_length(e)`` (global steps in epoch ``e``) and
    ``_epoch_batches(e)`` (those global steps, each ``W * groups_per_rank`` groups)."""

    def _epoch_length(self, epoch: int) -> int:
        raise NotImplementedError

    def _epoch_batches(self, epoch: int) -> List[List[List[int]]]:
        raise NotImplementedError

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

    def global_steps(self, start: int) -> Iterator[List[List[int]]]:
        epoch, offset = self.locate(start)
        while True:
            yield from self._epoch_batches(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        """Steps in one epoch (of epoch 0 where epochs differ)."""
        return self._epoch_length(0)


@DATA_SAMPLERS.register_module()
class BucketBatchSampler(_EpochSampler):
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
        self._hw = self.dataset_sizes()
        self.batch_size = positive_int('BucketBatchSampler', 'batch_size', batch_size)
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

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Dataset indices in the order of epoch ``epoch``."""
        return self.epoch_permutation(epoch, len(self._hw))

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
class TokenBudgetBatchSampler(_EpochSampler):
    """Each rank's step is ``packs_per_step`` packs of images whose token counts
    ``(H // patch_size) * (W // patch_size)`` sum to at most ``max_tokens`` each (NiT-style
    packing; the model sees one jagged batch).

    Packs are filled online, best fit (:func:`flexgen.datasets.packing.online.best_fit_stream`):
    a buffer holds the next ``buffer_size`` images of the epoch's order; the open pack
    takes the largest buffered image that still fits (the earliest of equal ones), the
    buffer refills from the order, and the pack closes when nothing fits or it holds
    ``max_images`` images. The pack sequence depends only on ``(seed, epoch)`` and the
    dataset, never on the number of ranks: global step s is packs
    ``[s * W * P, (s + 1) * W * P)`` with W ranks and ``P = packs_per_step``, and rank r
    takes P consecutive ones. So W ranks with P = 1 see at step s exactly what one process
    with ``packs_per_step = W`` sees. The packs that do not fill a last global batch of an
    epoch are dropped; :meth:`efficiency` reports how full the packs are. Resuming packs
    every epoch before the resumed one again (about 8 s per epoch of 3.8M images);
    :class:`~flexgen.datasets.pack_samplers.OnlinePackSampler` resumes by arithmetic.

    Args:
        sampler: the sampler mmengine builds from the dataloader's ``sampler`` config;
            only its ``dataset`` (and ``seed`` when ``seed`` is None) is used.
        max_tokens: the token budget of one pack.
        patch_size: pixels (or latent cells) per token along each side.
        buffer_size: how many upcoming images the packer may choose from.
        max_images: the most images in one pack; None for no limit.
        oversize: 'error' or 'drop', for images over ``max_tokens`` (checked when the
            sampler is built; dropped ones are counted in ``num_oversize`` and logged).
        packs_per_step: packs per rank and step (P above); None takes the dataloader's
            ``batch_size``, else 1.
        batch_size: passed by mmengine, see ``packs_per_step``. A ``batch_size`` above 1
            with neither ``packs_per_step`` nor ``max_images`` set is refused as ambiguous
            (packs per step, or a cap of images per pack?): say which.
        seed, shuffle: as in :class:`BucketBatchSampler`.
    """

    def __init__(self, sampler, max_tokens: int, patch_size: int = 1, buffer_size: int = 256,
                 max_images=None, oversize: str = 'error', packs_per_step=None,
                 batch_size=None, seed=None, shuffle: bool = True):
        name = 'TokenBudgetBatchSampler'
        if packs_per_step is None and max_images is None and batch_size not in (None, 1):
            raise ValueError(
                f'{name}: batch_size={batch_size} (the dataloader\'s, unless the batch_sampler '
                'config sets it) counts packs per rank and step, as in OfflinePackSampler and '
                'OnlinePackSampler, not the images of a pack (that is max_images): set '
                f'packs_per_step={batch_size} or max_images={batch_size} in the batch_sampler '
                'config, or the dataloader\'s batch_size to 1')
        super().__init__(sampler, seed, shuffle)
        self.max_tokens = positive_int(name, 'max_tokens', max_tokens)
        self.patch_size = positive_int(name, 'patch_size', patch_size)
        self.max_images = positive_int(name, 'max_images', max_images, allow_none=True)
        self.buffer_size = positive_int(name, 'buffer_size', buffer_size)
        self.packs_per_step = self.resolve_packs_per_step(packs_per_step, batch_size)
        self.groups_per_rank = self.packs_per_step
        self.tokens = self.token_counts(self.patch_size)
        over = self.leave_out_oversize(self.tokens, self.max_tokens, oversize, self.patch_size)
        self._kept = kept_mask(len(self.tokens), over) if len(over) else None
        self._token_list = self.tokens.tolist()
        self._lengths: Dict[int, int] = {}
        self._packs_cache = (None, None)
        if self._epoch_length(0) == 0:
            raise ValueError(f'{name}: epoch 0 packs into fewer than world_size x '
                             f'packs_per_step = {self.world_size * self.packs_per_step} packs')

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Dataset indices in the order of epoch ``epoch`` (without the oversize ones)."""
        order = self.epoch_permutation(epoch, len(self.tokens))
        return order if self._kept is None else order[torch.from_numpy(self._kept)[order]]

    def epoch_packs(self, epoch: int) -> List[List[int]]:
        """Every pack of epoch ``epoch``, in order (before dropping the incomplete
        global batch at the end)."""
        if self._packs_cache[0] == epoch:
            return self._packs_cache[1]
        packs = best_fit_stream(self.epoch_order(epoch).tolist(), self._token_list,
                                self.max_tokens, self.buffer_size, self.max_images)
        self._packs_cache = (epoch, packs)
        return packs

    def _epoch_length(self, epoch: int) -> int:
        if epoch not in self._lengths:
            per_step = self.world_size * self.packs_per_step
            self._lengths[epoch] = len(self.epoch_packs(epoch)) // per_step
        return self._lengths[epoch]

    def _epoch_batches(self, epoch: int) -> List[List[List[int]]]:
        packs, per_step = self.epoch_packs(epoch), self.world_size * self.packs_per_step
        return [packs[s * per_step:(s + 1) * per_step] for s in range(self._epoch_length(epoch))]

    def efficiency(self, epoch: int = 0) -> float:
        """Tokens used over tokens budgeted, over the packs epoch ``epoch`` keeps."""
        kept = self._epoch_length(epoch) * self.world_size * self.packs_per_step
        packs = self.epoch_packs(epoch)[:kept]
        used = sum(self._token_list[i] for pack in packs for i in pack)
        return used / (len(packs) * self.max_tokens)
