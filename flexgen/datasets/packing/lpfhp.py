"""Offline packing: longest-pack-first histogram packing (LPFHP; Krell et al. 2021,
"Efficient Sequence Packing without Cross-contamination", arXiv 2107.02027, as NiT runs it).

:func:`lpfhp` packs a whole dataset once from its length histogram into pack *strategies*
(how many packs hold which lengths); :func:`assign_indices` turns them into packs of
dataset indices; :func:`pack_offline` does both.
"""
import bisect
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from flexgen.rng import keyed_generator

from .lengths import length_histogram

Strategy = Tuple[int, Tuple[int, ...]]  # (how many packs, the lengths in each of them)


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
                 seed: Optional[int] = None, split: int = 1,
                 indices: Optional[Sequence[int]] = None) -> List[List[int]]:
    """LPFHP packs of dataset indices for images of token counts ``lengths``.

    ``split=S`` packs S contiguous chunks of ``len(lengths) // S`` images each on their own
    and drops the remainder (NiT's ``--split``); ``seed`` as in :func:`assign_indices`.
    ``indices`` packs only those dataset indices (e.g. all but the oversize ones), as if
    their lengths were the whole dataset.
    """
    if indices is not None:
        kept = np.asarray(indices, dtype=np.int64)
        packs = pack_offline(np.asarray(lengths, dtype=np.int64)[kept], max_len, max_per_pack,
                             seed, split)
        return [[int(kept[i]) for i in pack] for pack in packs]
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
