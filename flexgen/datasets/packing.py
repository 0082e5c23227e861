"""Sequence packing as pure functions: which images share a token budget.

Two packers, both over per-image token counts ("lengths"):

- **Offline, LPFHP** (longest-pack-first histogram packing; Krell et al. 2021, "Efficient
  Sequence Packing without Cross-contamination", arXiv 2107.02027, as NiT runs it): packs the
  whole dataset once from its length histogram. :func:`lpfhp` gives pack *strategies* (how
  many packs hold which lengths), :func:`assign_indices` turns them into packs of dataset
  indices, and :func:`save_sampler_meta` / :func:`load_sampler_meta` read and write NiT's
  sampler-meta JSON (a list of packs, each a list of 0-based data-meta line numbers).
- **Online** (:func:`fill_packs`): spreads a chunk of images over a FIXED number of packs,
  largest image first, each into the emptiest pack (worst-fit decreasing, i.e. LPT
  scheduling). With a fixed pack count a sampler can place any step by arithmetic, and the
  packs come out equally full, so ranks get equal work. :class:`OnlinePlan` cuts the
  epoch's token stream into such chunks; :func:`choose_fill` picks how full they can be.

:func:`best_fit_stream` is the streaming best fit of ``TokenBudgetBatchSampler`` (a pack
takes the largest image of a sliding buffer that still fits). :func:`packing_report` measures
all three on a size histogram.
"""
import bisect
import copy
import heapq
import json
import math
import os
import os.path as osp
import sys
from collections import deque
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from flexgen.rng import keyed_generator

Strategy = Tuple[int, Tuple[int, ...]]  # (how many packs, the lengths in each of them)


# ------------------------------------------------------------------------ helpers
def token_counts(sizes: Iterable[Sequence[int]], patch_size: int = 1) -> np.ndarray:
    """Tokens per image, ``(h // p) * (w // p)``, from sizes ``(h, w)``."""
    sizes = np.asarray(list(sizes), dtype=np.int64).reshape(-1, 2)
    return (sizes[:, 0] // patch_size) * (sizes[:, 1] // patch_size)


def length_histogram(lengths: Iterable[int]) -> Dict[int, int]:
    """``{length: how many}`` of a sequence of lengths, keys ascending."""
    values, counts = np.unique(np.asarray(list(lengths), dtype=np.int64), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def _as_histogram(histogram, max_len: int) -> Dict[int, int]:
    """A ``{length: count}`` dict from a mapping, or from NiT's array ``h[l - 1]``."""
    if isinstance(histogram, Mapping):
        items = [(int(length), int(count)) for length, count in histogram.items()]
    else:
        items = [(l + 1, int(c)) for l, c in enumerate(np.asarray(histogram).tolist())]
    result = {}
    for length, count in items:
        if count < 0:
            raise ValueError(f'lpfhp: histogram count {count} of length {length} is negative')
        if count and length < 1:
            raise ValueError(f'lpfhp: length {length} (count {count}) is not positive')
        if count and length > max_len:
            raise ValueError(f'lpfhp: {count} sequence(s) of length {length} exceed '
                             f'max_len={max_len}; drop or resize them first')
        if count:
            result[length] = result.get(length, 0) + count
    return result


# ------------------------------------------------------------------------ offline: LPFHP
def lpfhp(histogram: Union[Mapping[int, int], Sequence[int]], max_len: int,
          max_per_pack: Optional[int] = None) -> List[Strategy]:
    """Longest-pack-first histogram packing, step for step as NiT's ``pack_using_lpfhp``
    (with ``distribute=True``).

    Lengths are taken longest first. ``n`` sequences of length ``l`` go to the open packs
    with the LEAST free space that still holds ``l`` (best fit), as many per pack as fit
    (``min(free // l, room left in the image cap, n)``), splitting a group of identical
    packs when fewer sequences are left than packs; when no open pack fits, new packs of
    ``min(max_len // l, max_per_pack, n)`` copies of ``l`` open. A pack closes when full or
    at the cap. Identical packs travel as one ``(count, pack)`` entry, so the cost depends
    on the number of distinct lengths, not of sequences.

    Args:
        histogram: ``{length: count}``, or NiT's array with ``histogram[l - 1]`` sequences
            of length ``l``.
        max_len: the token budget of a pack.
        max_per_pack: the most sequences in one pack; None for no limit (NiT passes
            ``max_len``, which is the same).

    Returns:
        ``[(count, lengths)]``: ``count`` packs holding ``lengths`` (ascending), in NiT's
        order (closed packs grouped by free space in the order the groups appeared, then
        the packs still open).
    """
    counts = _as_histogram(histogram, max_len)
    limit = max_len if max_per_pack is None else int(max_per_pack)
    if limit < 1:
        raise ValueError(f'lpfhp: max_per_pack must be >= 1, got {max_per_pack}')
    open_packs: Dict[int, list] = {}  # free space -> [(count, pack)]; dict order is NiT's
    free_keys: List[int] = []         # the keys of open_packs, sorted, for the best-fit search
    closed: Dict[int, list] = {}

    def add(count, pack, free):
        if free == 0 or len(pack) == limit:
            closed.setdefault(free, []).append((count, pack))
            return
        if free not in open_packs:
            bisect.insort(free_keys, free)
        open_packs.setdefault(free, []).append((count, pack))

    for length in sorted(counts, reverse=True):
        n = counts[length]
        # NiT scans free space upwards from `length`; the first hit is the smallest key >= length.
        # Once nothing fits it stops looking for the rest of this length (no open pack it
        # creates can take another `length` either).
        may_fit = True
        while n > 0:
            k = bisect.bisect_left(free_keys, length) if may_fit else len(free_keys)
            if k < len(free_keys):
                free = free_keys[k]
                group = open_packs[free]
                old_count, pack = group.pop()  # the most recently added group: NiT's "worst"
                repeat = min(free // length, limit - len(pack), n)
                count = min(old_count, n // repeat)
                if old_count > count:
                    group.append((old_count - count, pack))
                n -= count * repeat
                add(count, pack + [length] * repeat, free - repeat * length)
                if not group:
                    del open_packs[free]
                    free_keys.remove(free)
            else:
                may_fit = False
                repeat = min(max_len // length, limit, n)
                add(n // repeat, [length] * repeat, max_len - repeat * length)
                n -= n // repeat * repeat

    for free, group in open_packs.items():
        closed.setdefault(free, []).extend(group)
    return [(count, tuple(reversed(pack))) for group in closed.values() for count, pack in group]


def strategies_efficiency(strategies: Sequence[Strategy], max_len: int) -> float:
    """Tokens used over tokens budgeted by the packs ``strategies`` describe."""
    used = sum(count * sum(pack) for count, pack in strategies)
    packs = sum(count for count, _ in strategies)
    return used / (packs * max_len) if packs else 0.0


def assign_indices(lengths: Sequence[int], strategies: Sequence[Strategy],
                   seed: Optional[int] = None) -> List[List[int]]:
    """Turn pack strategies into packs of dataset indices.

    Packs come out strategy by strategy, ``count`` times each; every length in a pack takes
    an unused index of that length. With ``seed=None`` this is NiT's choice (the LAST unused
    index of that length), so NiT's own sampler-meta files are reproduced; with a seed, the
    indices of each length are drawn in a seeded random order instead, so the same length
    histogram does not always put the same images together.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    pools = {}
    for length in np.unique(lengths).tolist():
        pool = np.flatnonzero(lengths == length)
        if seed is not None:
            pool = pool[torch.randperm(len(pool), generator=keyed_generator(seed, length)).numpy()]
        pools[length] = pool.tolist()
    packs = []
    for count, pack in strategies:
        for _ in range(count):
            try:
                packs.append([pools[length].pop() for length in pack])
            except (KeyError, IndexError):
                raise ValueError('assign_indices: the strategies ask for more images of some '
                                 'length than the dataset has (they were computed from another '
                                 'histogram)') from None
    return packs


def pack_offline(lengths: Sequence[int], max_len: int, max_per_pack: Optional[int] = None,
                 seed: Optional[int] = None, split: int = 1) -> List[List[int]]:
    """LPFHP packs of dataset indices for images of token counts ``lengths``.

    ``split=S`` packs S contiguous chunks of ``len(lengths) // S`` images each on their own
    and drops the remainder (NiT's ``--split``); ``seed`` as in :func:`assign_indices`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if split < 1:
        raise ValueError(f'pack_offline: split must be >= 1, got {split}')
    size = len(lengths) // split
    packs = []
    for part in range(split):
        start = part * size
        chunk = lengths[start:start + size]
        strategies = lpfhp(length_histogram(chunk), max_len, max_per_pack)
        part_seed = None if seed is None else (seed, part)
        packs += [[start + i for i in pack]
                  for pack in assign_indices(chunk, strategies, part_seed)]
    return packs


def save_sampler_meta(packs: Sequence[Sequence[int]], path: str) -> None:
    """Write packs as NiT's sampler-meta JSON (an indented list of lists of ints)."""
    if osp.dirname(path):
        os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump([[int(i) for i in pack] for pack in packs], f, indent=4)


def load_sampler_meta(path: str) -> List[List[int]]:
    """Read a sampler-meta JSON (NiT's or ours): a non-empty list of non-empty lists of
    non-negative ints. Anything else is a ValueError naming the file and the pack."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'sampler-meta file not found: {path}')
    with open(path) as f:
        try:
            packs = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f'{path}: not valid JSON ({error})') from None
    if not isinstance(packs, list) or not packs:
        raise ValueError(f'{path}: expected a non-empty JSON list of packs, got '
                         f'{type(packs).__name__} {str(packs)[:60]}')
    for k, pack in enumerate(packs):
        if (not isinstance(pack, list) or not pack
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                           for i in pack)):
            raise ValueError(f'{path}: pack {k} must be a non-empty list of dataset indices '
                             f'(ints >= 0), got {str(pack)[:80]}')
    return packs


# ------------------------------------------------------------------------ online packers
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
    into chunks of ``chunk_steps`` (the last may be shorter). A chunk owns the images whose token offset in the epoch's order falls in its
    share of ``[0, T)`` (proportional to its steps), and :func:`fill_packs` spreads them over
    the chunk's packs. Chunk ``c`` of epoch ``e`` depends on ``(seed, e, c)`` and the
    dataset only. Every image is used once per epoch, unless ``fill`` asks for more than
    the chunk packer reaches: then :func:`fill_packs` leaves some out (see
    :func:`choose_fill`).

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
            shuffled = torch.randperm(len(packs), generator=keyed_generator(self.seed, epoch, chunk))
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


# ------------------------------------------------------------------------ efficiency report
def load_size_histogram(path: str, kinds: Optional[Sequence[str]] = None,
                        patch_size: int = 1) -> Dict[int, int]:
    """``{tokens: images}`` from a size-histogram JSON (``{kind: [[h, w, count], ...]}``
    plus a ``description``, as ``tools/data/imagenet_like_latent_sizes.json``), summed over
    ``kinds`` (all kinds by default)."""
    with open(path) as f:
        table = json.load(f)
    kinds = [k for k in table if k != 'description'] if kinds is None else list(kinds)
    histogram: Dict[int, int] = {}
    for kind in kinds:
        if kind not in table:
            raise KeyError(f'{path}: no size list {kind!r}; it has {sorted(table)}')
        for row in table[kind]:
            if len(row) != 3:
                raise ValueError(f'{path}: {kind} entry {row} is not [h, w, count]')
            h, w, count = (int(x) for x in row)
            tokens = (h // patch_size) * (w // patch_size)
            histogram[tokens] = histogram.get(tokens, 0) + count
    return dict(sorted(histogram.items()))


def lengths_from_histogram(histogram: Mapping[int, int]) -> np.ndarray:
    """One length per image of a ``{length: count}`` histogram, ascending."""
    return np.repeat(np.fromiter(histogram.keys(), np.int64),
                     np.fromiter(histogram.values(), np.int64))


def online_epoch(plan: OnlinePlan, epoch: int = 0) -> Dict[str, float]:
    """Pack a whole epoch of ``plan``: tokens used over tokens budgeted, images left out,
    and the fullest and emptiest pack (in tokens)."""
    used, left_out, fullest, emptiest = 0, 0, 0, plan.max_len
    for chunk in range(plan.num_chunks):
        packs, left = plan.chunk(epoch, chunk)
        loads = [int(plan.lengths[pack].sum()) if pack else 0 for pack in packs]
        used, left_out = used + sum(loads), left_out + len(left)
        fullest, emptiest = max(fullest, max(loads)), min(emptiest, min(loads))
    return dict(efficiency=used / (plan.packs_per_epoch * plan.max_len), left_out=left_out,
                fullest=fullest, emptiest=emptiest)


def packing_report(histogram_path: str, lengths: Sequence[int] = (8192, 16384, 65536),
                   kinds: Optional[Sequence[str]] = None, chunk_packs: Optional[int] = None,
                   packs_per_step: int = 1, stream_buffer: int = 256, seed: int = 0,
                   stream: bool = True, verbose: bool = True) -> List[dict]:
    """Real tokens over budgeted tokens of each packer on a size histogram, per budget L.

    - offline: LPFHP over the whole histogram (:func:`lpfhp`);
    - online: :class:`OnlinePlan` with the fill :func:`choose_fill` picks, steps of
      ``packs_per_step`` packs (W ranks x P packs per rank), chunks of ``chunk_packs`` packs
      (default :func:`default_chunk_packs`), packed for one whole epoch (``left out``:
      images the chunk packer could not place; ``min..max``: the emptiest and fullest pack);
    - stream: :func:`best_fit_stream` with a ``stream_buffer``-image buffer (the packer of
      ``TokenBudgetBatchSampler``), over the same shuffled images.

    Returns one dict per budget; with ``verbose``, shows a progress bar (stderr) while it
    packs (a minute on the 3.8M-image default histogram) and prints the table and a legend
    of its columns.
    """
    histogram = load_size_histogram(histogram_path, kinds)
    all_lengths = lengths_from_histogram(histogram)
    rows = []
    bar = tqdm(total=len(lengths) * (3 if stream else 2), unit='stage', file=sys.stderr,
               disable=not verbose, dynamic_ncols=True)
    for max_len in lengths:
        bar.set_description(f'L={max_len}: offline LPFHP, online fill')
        strategies = lpfhp(histogram, max_len)
        chunk_steps = max(1, (chunk_packs or default_chunk_packs(max_len)) // packs_per_step)
        plan = choose_fill(all_lengths, np.arange(len(all_lengths)), max_len, packs_per_step,
                           chunk_steps, seed)
        bar.update(1)
        bar.set_description(f'L={max_len}: online epoch')
        online = online_epoch(plan)
        bar.update(1)
        row = dict(max_len=max_len, images=len(all_lengths),
                   offline=strategies_efficiency(strategies, max_len),
                   offline_packs=sum(c for c, _ in strategies), online=online['efficiency'],
                   online_fill=plan.fill, online_left_out=online['left_out'],
                   online_packs=plan.packs_per_epoch, online_fullest=online['fullest'],
                   online_emptiest=online['emptiest'])
        if stream:
            bar.set_description(f'L={max_len}: stream')
            order, _ = plan.epoch_order(0)
            packs = best_fit_stream(order.tolist(), all_lengths.tolist(), max_len,
                                    stream_buffer)
            row['stream'] = float(all_lengths.sum()) / (len(packs) * max_len)
            bar.update(1)
        rows.append(row)
    bar.close()
    if verbose:
        print(f'Packing efficiency (real tokens / budgeted tokens) on {histogram_path}, '
              f'kinds {", ".join(kinds) if kinds else "all"}: {len(all_lengths)} images')
        print(f'{"L":>6} | {"offline LPFHP":>13} {"packs":>7} | {"online":>8} {"fill":>7} '
              f'{"left out":>8} {"min..max pack":>13} | {"stream":>8}')
        for r in rows:
            print(f'{r["max_len"]:>6} | {r["offline"]:>13.3%} {r["offline_packs"]:>7} | '
                  f'{r["online"]:>8.3%} {r["online_fill"]:>7.4f} {r["online_left_out"]:>8} '
                  f'{r["online_emptiest"]:>6}..{r["online_fullest"]:<6} | '
                  f'{r.get("stream", float("nan")):>8.3%}')
        chunk = f'{chunk_packs} packs' if chunk_packs else 'default_chunk_packs(L)'
        print(f"""Columns (efficiency = real tokens / (packs x L)):
  L              the token budget of a pack
  offline LPFHP  efficiency of LPFHP over the whole histogram (the packs pack_dataset.py writes
                 for OfflinePackSampler); packs: how many it makes
  online         efficiency of OnlinePackSampler's chunk packer over one shuffled epoch
                 ({packs_per_step} pack(s) per step, chunks of {chunk}); fill: the highest
                 average share of L its packs aim for; left out: images it could not place in
                 that epoch; min..max pack: tokens in its emptiest and fullest pack
  stream         efficiency of TokenBudgetBatchSampler's best-fit packer ({stream_buffer}-image
                 buffer) over the same shuffled images""")
    return rows
