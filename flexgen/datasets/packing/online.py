"""Online packers: which images share a token budget, decided while training.

- :func:`fill_packs` spreads a chunk of images over a FIXED number of packs, largest image
  first, each into the emptiest pack (worst-fit decreasing, i.e. LPT scheduling). With a
  fixed pack count a sampler can place any step by arithmetic, and the packs come out
  equally full, so ranks get equal work. :class:`OnlinePlan` cuts the epoch's token
  stream into such chunks; :func:`choose_fill` picks how full they can be
  (``OnlinePackSampler``).
- :func:`best_fit_stream`: a pack takes the largest image of a sliding buffer that still
  fits (``TokenBudgetBatchSampler``).
"""
import bisect
import copy
import heapq
import math
from collections import deque
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from flexgen.rng import keyed_generator

from .lengths import length_histogram
from .lpfhp import lpfhp, strategies_efficiency


def best_fit_stream(order: Sequence[int], lengths: Sequence[int], max_len: int,
                    buffer_size: int, max_per_pack: Optional[int] = None) -> List[List[int]]:
    """Streaming best fit: a buffer holds the next ``buffer_size`` images of ``order``;
    the open pack takes the largest buffered image that still fits (the earliest of equal
    ones), the buffer refills, and the pack closes when nothing fits or it holds
    ``max_per_pack`` images. Returns every pack, in order (the last ones may be light)."""
    buffer: Dict[int, deque] = {}  # length -> buffered indices, oldest first
    sizes: List[int] = []          # the distinct lengths in the buffer, ascending
    position, buffered, packs = 0, 0, []
    while True:
        pack, room = [], max_len
        while max_per_pack is None or len(pack) < max_per_pack:
            while buffered < buffer_size and position < len(order):
                index = order[position]
                length = lengths[index]
                if length not in buffer or not buffer[length]:
                    buffer[length] = deque()
                    bisect.insort(sizes, length)
                buffer[length].append(index)
                buffered, position = buffered + 1, position + 1
            k = bisect.bisect_right(sizes, room) - 1
            if k < 0:
                break
            length = sizes[k]
            pack.append(buffer[length].popleft())
            if not buffer[length]:
                sizes.pop(k)
            buffered, room = buffered - 1, room - length
        if not pack:
            return packs
        packs.append(pack)


def fill_packs(indices: Sequence[int], lengths: Sequence[int], num_packs: int, max_len: int,
               max_per_pack: Optional[int] = None) -> Tuple[List[List[int]], List[int]]:
    """Spread images over exactly ``num_packs`` packs: largest first (ties in the given
    order), each into the pack with the fewest tokens that can still take an image
    (worst-fit decreasing, i.e. LPT scheduling; ties to the lowest pack number). If an
    image does not fit there it fits nowhere: it is left out.

    The loads end up level, within about the size of the last (smallest) images, so as
    long as the total stays that much below ``num_packs * max_len`` nothing is left out.
    Returns ``(packs, left_out)``; each pack lists its images in placement order.
    """
    indices = np.asarray(indices, dtype=np.int64)
    sizes = np.asarray(lengths, dtype=np.int64)[indices]
    ranked = np.argsort(-sizes, kind='stable')
    packs: List[List[int]] = [[] for _ in range(num_packs)]
    heap = [(0, k) for k in range(num_packs)]  # (tokens, pack): a valid heap already
    left_out = []
    for index, length in zip(indices[ranked].tolist(), sizes[ranked].tolist()):
        if not heap or heap[0][0] + length > max_len:
            left_out.append(index)
            continue
        load, k = heap[0]
        packs[k].append(index)
        if max_per_pack is not None and len(packs[k]) >= max_per_pack:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (load + length, k))
    return packs, left_out


class OnlinePlan:
    """Where every pack of an online-packed, infinite stream of epochs comes from, found by
    arithmetic: no earlier pack is ever computed, so resuming at any step packs one chunk.

    Epoch ``e`` walks a permutation of ``indices`` drawn from ``(seed, e)`` (their own order
    with ``shuffle=False``). All of its ``T`` tokens go into a number of packs fixed in
    advance, a multiple of ``packs_per_step`` so that every step is complete::

        steps_per_epoch = ceil(T / (fill * max_len * packs_per_step))

    so a pack holds ``T / (steps_per_epoch * packs_per_step)`` tokens on average: at most
    ``fill * max_len``, and less by at most one step's share. The epoch's steps are cut
    into chunks of ``chunk_steps`` (the last may be shorter). A chunk owns the images whose
    token offset in the epoch's order falls in its share of ``[0, T)`` (proportional to its
    steps), and :func:`fill_packs` spreads them over the chunk's packs. Chunk ``c`` of
    epoch ``e`` depends on ``(seed, e, c)`` and the dataset only. Every image is used once
    per epoch, unless ``fill`` asks for more than the chunk packer reaches: then
    :func:`fill_packs` leaves some out (see :func:`choose_fill`).

    Args:
        lengths: tokens of every dataset index.
        indices: the indices to pack (e.g. all but the oversize ones).
        max_len: the token budget of a pack.
        packs_per_step: packs in one (global) step.
        chunk_steps: steps per chunk.
        fill: the highest average fill of a pack, in (0, 1].
        seed, shuffle: the epoch order.
        max_per_pack: the most images in a pack (None: no limit).
    """

    def __init__(self, lengths: Sequence[int], indices: Sequence[int], max_len: int,
                 packs_per_step: int, chunk_steps: int, fill: float, seed: int,
                 shuffle: bool = True, max_per_pack: Optional[int] = None):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.max_len, self.packs_per_step = int(max_len), int(packs_per_step)
        self.chunk_steps, self.fill = int(chunk_steps), float(fill)
        self.seed, self.shuffle, self.max_per_pack = int(seed), shuffle, max_per_pack
        self.total_tokens = int(self.lengths[self.indices].sum())
        # Caches that do not depend on the fill, shared with the copies of with_fill: the
        # last epoch order, and the cumulative tokens of the images sorted largest first.
        self._shared = dict(order=(None, None), largest_first=None)
        self._set_fill(fill)

    def _set_fill(self, fill: float) -> None:
        self.fill = float(fill)
        if not 0 < self.fill <= 1:
            raise ValueError(f'OnlinePlan: fill must be in (0, 1], got {fill}')
        if self.total_tokens == 0:
            raise ValueError('OnlinePlan: no images to pack')
        self.steps_per_epoch = math.ceil(
            self.total_tokens / (self.fill * self.max_len * self.packs_per_step))
        self.packs_per_epoch = self.steps_per_epoch * self.packs_per_step
        self._chunk_cache = (None, None)

    def with_fill(self, fill: float) -> 'OnlinePlan':
        """The same plan at another fill (sharing the caches that do not depend on it)."""
        plan = copy.copy(self)
        plan._set_fill(fill)
        return plan

    @property
    def num_chunks(self) -> int:
        return -(-self.steps_per_epoch // self.chunk_steps)

    @property
    def efficiency(self) -> float:
        """Tokens used over tokens budgeted, over an epoch in which nothing is left out."""
        return self.total_tokens / (self.packs_per_epoch * self.max_len)

    def locate(self, step: int) -> Tuple[int, int, int]:
        """``(epoch, chunk, step within the chunk)`` of global step ``step``."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        chunk, in_chunk = divmod(in_epoch, self.chunk_steps)
        return epoch, chunk, in_chunk

    def chunk_bounds(self, chunk: int) -> Tuple[int, int, int, int]:
        """``(first step, end step, first token, end token)`` of chunk ``chunk`` in its epoch."""
        first = chunk * self.chunk_steps
        end = min(first + self.chunk_steps, self.steps_per_epoch)
        return (first, end, self.total_tokens * first // self.steps_per_epoch,
                self.total_tokens * end // self.steps_per_epoch)

    def epoch_order(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """The epoch's image order and each image's token offset in it (cached per epoch)."""
        if self._shared['order'][0] != epoch:
            order = self.indices
            if self.shuffle:
                generator = keyed_generator(self.seed, epoch)
                order = order[torch.randperm(len(order), generator=generator).numpy()]
            offsets = np.cumsum(self.lengths[order]) - self.lengths[order]
            self._shared['order'] = (epoch, (order, offsets))
        return self._shared['order'][1]

    def chunk(self, epoch: int, chunk: int) -> Tuple[List[List[int]], List[int]]:
        """``(packs, left_out)`` of chunk ``chunk`` of epoch ``epoch`` (the last one is cached)."""
        if self._chunk_cache[0] != (epoch, chunk):
            first, end, lo, hi = self.chunk_bounds(chunk)
            order, offsets = self.epoch_order(epoch)
            a, b = np.searchsorted(offsets, [lo, hi], side='left')
            packs, left_out = fill_packs(order[a:b], self.lengths,
                                         (end - first) * self.packs_per_step, self.max_len,
                                         self.max_per_pack)
            # Level packs are interchangeable: shuffle them, so that pack 0 (which took the
            # largest image) does not always go to the same rank.
            generator = keyed_generator(self.seed, epoch, chunk)
            shuffled = torch.randperm(len(packs), generator=generator)
            self._chunk_cache = ((epoch, chunk), ([packs[k] for k in shuffled.tolist()],
                                                  left_out))
        return self._chunk_cache[1]

    def step(self, step: int) -> List[List[int]]:
        """The ``packs_per_step`` packs of global step ``step``."""
        epoch, chunk, in_chunk = self.locate(step)
        packs, _ = self.chunk(epoch, chunk)
        return packs[in_chunk * self.packs_per_step:(in_chunk + 1) * self.packs_per_step]

    def fewest_images_per_chunk(self) -> int:
        """The fewest images a chunk can get, whatever the order (if the largest images
        all met in it). Fewer images than packs would leave a pack empty."""
        if self._shared['largest_first'] is None:
            self._shared['largest_first'] = np.cumsum(np.sort(self.lengths[self.indices])[::-1])
        cumulative = self._shared['largest_first']
        largest, fewest = int(cumulative[0]), len(cumulative)
        for chunk in {0, self.num_chunks - 1}:
            first, end, lo, hi = self.chunk_bounds(chunk)
            # The images starting in [lo, hi) cover [lo + (< one image), >= hi); other
            # chunks of this size differ by one token of rounding.
            need = max(hi - lo - largest, 1)
            fewest = min(fewest, int(np.searchsorted(cumulative, need, side='left')) + 1)
        return fewest

    def may_leave_a_pack_empty(self) -> bool:
        """True if some order could give a chunk fewer images than packs."""
        most_packs = min(self.chunk_steps, self.steps_per_epoch) * self.packs_per_step
        return self.fewest_images_per_chunk() < most_packs


# About this many tokens per chunk by default: big enough that the images straddling a
# chunk's share of tokens are a rounding error, small enough to pack in well under a second.
CHUNK_TOKENS = 2 ** 24


def default_chunk_packs(max_len: int) -> int:
    """Packs per chunk by default: :data:`CHUNK_TOKENS` worth (1024 packs at L = 16384)."""
    return max(1, CHUNK_TOKENS // max_len)


# Tokens per pack the automatic fill leaves free below the best offline fill, tried in turn.
FILL_SLACKS = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536,
               2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768)


def choose_fill(lengths: Sequence[int], indices: Sequence[int], max_len: int,
                packs_per_step: int, chunk_steps: int, seed: int, shuffle: bool = True,
                max_per_pack: Optional[int] = None, trial_chunks: int = 6) -> OnlinePlan:
    """The :class:`OnlinePlan` with the highest fill that packs cleanly, with a margin.

    The fills tried, highest first, are ``best - slack / max_len`` for each slack of
    :data:`FILL_SLACKS` tokens per pack, where ``best`` is what LPFHP reaches on the images'
    own length histogram. Whether a chunk leaves images out is nearly all-or-nothing (it
    depends on how many small images it got to level its packs with), so a fill is first
    tried on ``trial_chunks`` chunks of epoch 0 spread from the first to the last, and
    then on every chunk of epoch 0. The first fill that packs the whole epoch cleanly marks
    where the chunk packer works; the plan takes the next slack (1.33 to 1.5 times as much)
    so that other epochs pack cleanly too. Cost: about one epoch of packing (seconds per
    million images), once. Raises ValueError when no fill works, or when the fills that
    work could leave a pack empty (images too large against the budget for this packer:
    use offline packs).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    kept = np.asarray(indices, dtype=np.int64)
    best = strategies_efficiency(lpfhp(length_histogram(lengths[kept]), max_len, max_per_pack),
                                 max_len)
    base = None  # the first plan: the others share its epoch order and sorted sizes

    def plan_at(slack):
        nonlocal base
        fill = best - slack / max_len
        if fill <= 0:
            return None
        if base is None:
            base = OnlinePlan(lengths, kept, max_len, packs_per_step, chunk_steps, fill, seed,
                              shuffle, max_per_pack)
            return base
        return base.with_fill(fill)

    def clean(plan, chunks):
        return not any(plan.chunk(0, c)[1] for c in chunks)

    failed_steps = None
    for k, slack in enumerate(FILL_SLACKS):
        plan = plan_at(slack)
        if plan is None:
            break
        # Whether a pack may stay empty depends on how the steps fall into chunks, not
        # monotonically on the fill (800 images, 16-pack chunks: possible at 81 to 83
        # steps, not at 80 or 85), so a lower fill may still be safe.
        if plan.may_leave_a_pack_empty():
            continue
        if plan.steps_per_epoch == failed_steps:
            continue  # the packs depend on the fill only through the number of steps
        spread = np.linspace(0, plan.num_chunks - 1, trial_chunks).round().astype(int)
        if clean(plan, np.unique(spread).tolist()) and clean(plan, range(plan.num_chunks)):
            safer = plan_at(FILL_SLACKS[k + 1]) if k + 1 < len(FILL_SLACKS) else None
            return plan if safer is None or safer.may_leave_a_pack_empty() else safer
        failed_steps = plan.steps_per_epoch
    raise ValueError(
        f'choose_fill: no fill packs these {len(kept)} images (LPFHP reaches {best:.4f} of '
        f'{max_len} tokens) online without leaving images out or packs empty: the images are '
        'too large against the budget for the chunk packer; raise max_tokens, set fill, or '
        'use offline LPFHP packs (OfflinePackSampler)')
