"""Data samplers that serve token-budget packs (NiT-style packed training).

Each step gives every rank ``packs_per_step`` packs, as ONE list of dataset indices (the
packs concatenated), dealt out of one sequence of global steps as every
:class:`~flexgen.datasets.base_sampler.GlobalBatchSampler` does. Both samplers here:

- never let a step span two epochs, and use an image at most once per epoch, so ranks never
  share an image;
- place any step by arithmetic: :meth:`set_start_iter` resumes at a step without replaying
  or packing anything before it;
- check every image against the budget when they are built, never mid-epoch. An image
  with more tokens than the budget is an error naming it, or with ``oversize='drop'`` is
  left out, counted in ``num_oversize`` and logged through mmengine's current logger.
  There is no 'resize' policy here: a dataset that resizes large images must report the
  resized size from ``get_size``, and the sampler then sees it within budget.

:class:`OfflinePackSampler` serves packs computed once (``tools/pack_dataset.py``, NiT's
sampler-meta files). :class:`OnlinePackSampler` packs on the fly, chunk by chunk.
"""
import logging
from typing import Iterator, List, Optional

import numpy as np
import torch
from mmengine.logging import print_log

from flexgen.registry import DATA_SAMPLERS

from .base_sampler import GlobalBatchSampler, positive_int
from .packing.lengths import check_oversize_policy, kept_mask
from .packing.online import OnlinePlan, choose_fill, default_chunk_packs
from .packing.sampler_meta import load_sampler_meta


class _StepPackSampler(GlobalBatchSampler):
    """Packs placed by arithmetic: a subclass gives ``_global_packs(step)`` (the W * P packs
    of global step ``step``) and ``steps_per_epoch``."""

    def __init__(self, sampler, packs_per_step, batch_size, seed, shuffle):
        super().__init__(sampler, seed, shuffle)
        self.packs_per_step = self.resolve_packs_per_step(packs_per_step, batch_size)
        self.groups_per_rank = self.packs_per_step
        self.global_packs = self.packs_per_step * self.world_size

    def _global_packs(self, step: int) -> List[List[int]]:
        raise NotImplementedError

    def global_steps(self, start: int) -> Iterator[List[List[int]]]:
        step = start
        while True:
            yield self._global_packs(step)
            step += 1

    def step_packs(self, step: int) -> List[List[int]]:
        """This rank's ``packs_per_step`` packs at global step ``step``."""
        return self.rank_groups(self._global_packs(step))

    def __len__(self) -> int:
        """Steps in one epoch."""
        return self.steps_per_epoch


@DATA_SAMPLERS.register_module()
class OfflinePackSampler(_StepPackSampler):
    """Serves packs read from a sampler-meta JSON: NiT's own files, or those
    ``tools/pack_dataset.py`` writes (a list of packs, each a list of dataset indices).

    Epoch ``e`` serves the packs in the order ``torch.randperm(num_packs)`` drawn from a
    generator seeded with ``seed + e`` (NiT's ``get_packed_batch_sampler``), dealt out
    ``W * P`` packs per global step: with one pack per step, rank r at step s of the epoch
    gets pack ``perm[s * W + r]``. An epoch has ``num_packs // (W * P)`` steps; the last
    ``num_packs % (W * P)`` packs of its order (a different few each epoch) wait for the
    next epoch, so that a step never spans two epochs and ranks never share an image.
    When ``W * P`` divides ``num_packs`` this is exactly NiT's sampler (which instead deals
    the epochs round-robin as one stream): a NiT run and a flexgen run with the same file
    and seed see the same packs.

    Args:
        sampler: the sampler mmengine builds from the dataloader's ``sampler`` config; only
            its ``dataset`` (and ``seed`` when ``seed`` is None) is used.
        meta_file: the sampler-meta JSON.
        max_tokens: the budget the packs were made for. When given, every image's tokens
            (``dataset.get_size``, ``patch_size``) are checked once at build: an image over
            it follows ``oversize``, a pack over it is an error (a file made for a larger
            budget). None skips the check (and needs no ``get_size``).
        patch_size: pixels (or latent cells) per token along each side.
        oversize: 'error' or 'drop' (the image leaves its pack; empty packs go).
        packs_per_step: packs per rank and step; None takes the dataloader's
            ``batch_size`` (NiT's "packs per device"), else 1.
        batch_size: passed by mmengine, see ``packs_per_step``.
        seed: None takes the wrapped sampler's seed, else ``sync_random_seed()``.
        shuffle: False serves the packs in file order every epoch.
    """

    def __init__(self, sampler, meta_file: str, max_tokens: Optional[int] = None,
                 patch_size: int = 1, oversize: str = 'error',
                 packs_per_step: Optional[int] = None, batch_size: Optional[int] = None,
                 seed: Optional[int] = None, shuffle: bool = True):
        super().__init__(sampler, packs_per_step, batch_size, seed, shuffle)
        name = 'OfflinePackSampler'
        self.meta_file = meta_file
        packs = load_sampler_meta(meta_file)
        flat = np.fromiter((i for pack in packs for i in pack), np.int64)
        if hasattr(self.dataset, '__len__') and flat.max() >= len(self.dataset):
            k = next(k for k, pack in enumerate(packs) if max(pack) >= len(self.dataset))
            raise ValueError(f'{name}: {meta_file}: pack {k} holds index {max(packs[k])}, but '
                             f'the dataset has {len(self.dataset)} images (a file made for '
                             'another data-meta?)')
        values, counts = np.unique(flat, return_counts=True)
        if (counts > 1).any():
            i = int(values[np.argmax(counts > 1)])
            where = [k for k, pack in enumerate(packs) if i in pack][:3]
            raise ValueError(f'{name}: {meta_file}: index {i} is in more than one pack '
                             f'(packs {where}); ranks would share images')
        self.tokens = None
        self.max_tokens = positive_int(name, 'max_tokens', max_tokens, allow_none=True)
        if self.max_tokens is not None:
            self.patch_size = positive_int(name, 'patch_size', patch_size)
            self.tokens = self.token_counts(self.patch_size)
            over = self.leave_out_oversize(self.tokens, self.max_tokens, oversize,
                                           self.patch_size)
            if len(over):
                kept = kept_mask(len(self.tokens), over)
                packs = [pack for pack in ([i for i in pack if kept[i]] for pack in packs)
                         if pack]
            loads = [int(self.tokens[pack].sum()) for pack in packs]
            k = int(np.argmax(loads))
            if loads[k] > self.max_tokens:
                raise ValueError(f'{name}: {meta_file}: pack {k} holds {loads[k]} tokens, more '
                                 f'than max_tokens={self.max_tokens} (patch_size '
                                 f'{self.patch_size}): the file was packed for another '
                                 'budget or dataset')
        else:
            check_oversize_policy(name, oversize)
        if len(packs) < self.global_packs:
            raise ValueError(f'{name}: {meta_file} has {len(packs)} packs, fewer than one step '
                             f'of {self.world_size} rank(s) x {self.packs_per_step} pack(s)')
        self.packs = packs
        self.steps_per_epoch = len(packs) // self.global_packs
        self._order = (None, None)

    def epoch_order(self, epoch: int) -> List[int]:
        """Pack numbers in the order of epoch ``epoch`` (NiT: randperm seeded seed + epoch)."""
        if self._order[0] != epoch:
            n = len(self.packs)
            order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
                     if self.shuffle else torch.arange(n))
            self._order = (epoch, order.tolist())
        return self._order[1]

    def _global_packs(self, step: int) -> List[List[int]]:
        epoch, step = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)[step * self.global_packs:(step + 1) * self.global_packs]
        return [self.packs[k] for k in order]

    def efficiency(self) -> float:
        """Tokens used over tokens budgeted, over all packs (needs ``max_tokens``)."""
        if self.tokens is None:
            raise ValueError('OfflinePackSampler.efficiency: built without max_tokens')
        used = sum(int(self.tokens[pack].sum()) for pack in self.packs)
        return used / (len(self.packs) * self.max_tokens)


@DATA_SAMPLERS.register_module()
class OnlinePackSampler(_StepPackSampler):
    """Packs images into token budgets on the fly from a seeded order: no meta file.

    Each epoch's order (a permutation drawn from ``(seed, epoch)``) is cut into chunks of
    about ``chunk_packs`` packs' worth of tokens; the images of a chunk are spread over
    exactly that many packs, largest first, each into the emptiest pack (a decreasing-size
    fill, :func:`flexgen.datasets.packing.fill_packs`). The packs come out level: every
    rank and step gets about ``fill * max_tokens`` tokens (within ~1% of each other), so no
    rank waits for another. An epoch has ``ceil(tokens / (fill * max_tokens * W * P))``
    steps and uses every image once (:class:`flexgen.datasets.packing.OnlinePlan`).

    **Resume.** Every chunk's number of packs is fixed before anything is packed, so step
    ``s`` lies in epoch ``s // steps_per_epoch``, chunk ``(s % steps_per_epoch) //
    chunk_steps``, by arithmetic. :meth:`set_start_iter` therefore packs only the chunk of
    the resumed step (one permutation of the dataset and one chunk fill: 1-2 s for the
    3.8M images of merged ImageNet), never the steps before it. There is no state to save:
    the step number the checkpoint already holds is enough.

    ``fill='auto'`` (default) takes the highest fill at which a whole epoch packs without
    leaving an image out, with a margin (:func:`flexgen.datasets.packing.choose_fill`;
    logged). That costs about one epoch of packing when the sampler is built: 20-40 s for
    the 3.8M images of merged ImageNet on one CPU core. On the ImageNet-like histogram
    (``tools/pack_dataset.py --report``) it fills 99.59%, 99.70% and 99.95% of the budget
    at L = 8192, 16384 and 65536 (offline LPFHP: 99.98-99.99%; the streaming best fit of
    ``TokenBudgetBatchSampler``: 99.86-99.99%, but it resumes by packing every earlier
    epoch again). Should a chunk of a later epoch still fail to place an image (not seen
    in the measurements; likelier with a ``fill`` set by hand), that image sits out the
    epoch: counted in ``num_left_out`` and logged, never an error. Each rank packs all
    W * P packs of a step (a few microseconds per image), a chunk at a time, in the process
    that iterates the sampler.

    Args:
        sampler: the sampler mmengine builds from the dataloader's ``sampler`` config; only
            its ``dataset`` (and ``seed`` when ``seed`` is None) is used.
        max_tokens: the token budget of one pack.
        patch_size: pixels (or latent cells) per token along each side.
        fill: 'auto', or the highest average fill of a pack in (0, 1].
        chunk_packs: packs per chunk, rounded down to whole steps of W * P packs; None:
            ``2**24 // max_tokens`` (1024 at 16384).
        max_images: the most images in one pack; None for no limit.
        oversize: 'error' or 'drop', for images over ``max_tokens``.
        packs_per_step: packs per rank and step; None takes the dataloader's
            ``batch_size`` (NiT's "packs per device"), else 1.
        batch_size: passed by mmengine, see ``packs_per_step``.
        seed: None takes the wrapped sampler's seed, else ``sync_random_seed()``.
        shuffle: False packs the images in index order every epoch.
    """

    def __init__(self, sampler, max_tokens: int, patch_size: int = 1, fill='auto',
                 chunk_packs: Optional[int] = None, max_images: Optional[int] = None,
                 oversize: str = 'error', packs_per_step: Optional[int] = None,
                 batch_size: Optional[int] = None, seed: Optional[int] = None,
                 shuffle: bool = True):
        super().__init__(sampler, packs_per_step, batch_size, seed, shuffle)
        name = 'OnlinePackSampler'
        self.max_tokens = positive_int(name, 'max_tokens', max_tokens)
        self.patch_size = positive_int(name, 'patch_size', patch_size)
        if chunk_packs is None:
            chunk_packs = default_chunk_packs(self.max_tokens)
        self.chunk_packs = positive_int(name, 'chunk_packs', chunk_packs)
        self.max_images = positive_int(name, 'max_images', max_images, allow_none=True)
        self.tokens = self.token_counts(self.patch_size)
        over = self.leave_out_oversize(self.tokens, self.max_tokens, oversize, self.patch_size)
        kept = np.flatnonzero(kept_mask(len(self.tokens), over))
        if len(kept) == 0:
            raise ValueError(f'{name}: every image exceeds max_tokens={self.max_tokens}')
        chunk_steps = max(1, self.chunk_packs // self.global_packs)
        args = (self.tokens, kept, self.max_tokens, self.global_packs, chunk_steps)
        if fill == 'auto':
            self.plan = choose_fill(*args, self.seed, shuffle, self.max_images)
        else:
            if isinstance(fill, bool) or not isinstance(fill, (float, int)) or not 0 < fill <= 1:
                raise ValueError(f"{name}: fill must be 'auto' or a number in (0, 1], got "
                                 f'{fill!r}')
            self.plan = OnlinePlan(*args, fill, self.seed, shuffle, self.max_images)
            if self.plan.may_leave_a_pack_empty():
                raise ValueError(
                    f'{name}: at fill={fill} a chunk of {chunk_steps * self.global_packs} '
                    f'packs could get only {self.plan.fewest_images_per_chunk()} images (its '
                    'images are large against max_tokens), leaving packs empty; raise fill, '
                    'lower max_tokens, or use OfflinePackSampler')
        self.fill = self.plan.fill
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.num_left_out = 0
        self._logged_chunk = None
        print_log(f'{name}: {len(kept)} images, {self.plan.total_tokens} tokens -> '
                  f'{self.steps_per_epoch} steps per epoch of {self.world_size} x '
                  f'{self.packs_per_step} packs of {self.max_tokens} tokens, fill '
                  f'{self.fill:.4f}{" (auto)" if fill == "auto" else ""}: '
                  f'{self.plan.efficiency:.3%} of the budget used', logger='current',
                  level=logging.INFO)

    def _global_packs(self, step: int) -> List[List[int]]:
        epoch, chunk, _ = self.plan.locate(step)
        _, left_out = self.plan.chunk(epoch, chunk)
        if left_out and self._logged_chunk != (epoch, chunk):
            self._logged_chunk = (epoch, chunk)
            self.num_left_out += len(left_out)
            print_log(f'OnlinePackSampler: chunk {chunk} of epoch {epoch} could not place '
                      f'{len(left_out)} image(s) (e.g. index {left_out[0]} with '
                      f'{int(self.tokens[left_out[0]])} tokens) at fill {self.fill:.4f}; they '
                      'are left out of this epoch. Lower fill to avoid it.', logger='current',
                      level=logging.WARNING)
        return self.plan.step(step)

    def efficiency(self) -> float:
        """Tokens used over tokens budgeted, over an epoch that leaves nothing out."""
        return self.plan.efficiency
