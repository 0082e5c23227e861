"""Token counts of images, their histograms, and the policy for images over a budget."""
import json
import os.path as osp
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

OVERSIZE_POLICIES = ('error', 'drop')


def token_counts(sizes: Iterable[Sequence[int]], patch_size: int = 1) -> np.ndarray:
    """Tokens per image, ``(h // p) * (w // p)``, from sizes ``(h, w)``."""
    sizes = np.asarray(list(sizes), dtype=np.int64).reshape(-1, 2)
    return (sizes[:, 0] // patch_size) * (sizes[:, 1] // patch_size)


def length_histogram(lengths: Iterable[int]) -> Dict[int, int]:
    """``{length: how many}`` of a sequence of lengths, keys ascending."""
    values, counts = np.unique(np.asarray(list(lengths), dtype=np.int64), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


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


def data_meta_lengths(path: str, patch_size: int = 1) -> np.ndarray:
    """Tokens of every line of a NiT data-meta jsonl: ``(latent_h // p) * (latent_w // p)``."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'data-meta file not found: {path}')
    sizes = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f'{path}:{number}: not a JSON object ({error})') from None
            for key in ('latent_h', 'latent_w'):
                if not isinstance(item, dict) or not isinstance(item.get(key), int):
                    raise ValueError(f'{path}:{number}: field {key!r} must be an int, got '
                                     f'{item.get(key) if isinstance(item, dict) else item!r}')
            sizes.append((item['latent_h'], item['latent_w']))
    if not sizes:
        raise ValueError(f'{path}: no entries')
    return token_counts(sizes, patch_size)


def dataset_sizes(dataset, owner: str) -> List[Tuple[int, int]]:
    """``(H, W)`` of every index of ``dataset`` (``get_size``); a TypeError if it has no
    ``get_size``, a ValueError if it is empty."""
    if not hasattr(dataset, 'get_size'):
        raise TypeError(f'{owner}: the dataset {type(dataset).__name__} has no '
                        'get_size(index) -> (H, W), which size-aware batching needs')
    sizes = [tuple(int(x) for x in dataset.get_size(i)) for i in range(len(dataset))]
    if not sizes:
        raise ValueError(f'{owner}: the dataset is empty')
    return sizes


def dataset_token_counts(dataset, patch_size: int, owner: str) -> np.ndarray:
    """Tokens of every index of ``dataset`` (:func:`dataset_sizes`, ``patch_size``); a
    ValueError naming an image smaller than one patch."""
    sizes = dataset_sizes(dataset, owner)
    tokens = token_counts(sizes, patch_size)
    if tokens.min() < 1:
        i = int(np.argmin(tokens))
        raise ValueError(f'{owner}: dataset index {i} of size {sizes[i]} is smaller '
                         f'than one patch of {patch_size} x {patch_size}')
    return tokens


def kept_mask(count: int, left_out: Sequence[int]) -> np.ndarray:
    """Which of ``count`` items survive a filter that leaves out the positions
    ``left_out``: a boolean array, True for the kept ones."""
    kept = np.ones(count, dtype=bool)
    kept[np.asarray(left_out, dtype=np.int64)] = False
    return kept


def check_oversize_policy(owner: str, oversize: str) -> None:
    if oversize not in OVERSIZE_POLICIES:
        hint = (" (resizing is the dataset's job: make get_size report the resized size)"
                if oversize == 'resize' else '')
        raise ValueError(f'{owner}: oversize must be one of {OVERSIZE_POLICIES}, got '
                         f'{oversize!r}{hint}')


def find_oversize(lengths: Sequence[int], max_len: int, oversize: str, owner: str,
                  describe: Optional[Callable[[int], str]] = None, budget: str = '',
                  remedy: str = '') -> np.ndarray:
    """Positions of the ``lengths`` over ``max_len``. With ``oversize='error'`` any is a
    ValueError naming the first and how many there are; with ``'drop'`` they are returned,
    for the caller to leave out and log.

    Args:
        describe: ``describe(i)`` names image ``i`` and its tokens in the message (default
            ``index i has n tokens``).
        budget: how the message names the limit (default ``max_tokens=<max_len>``).
        remedy: what the message advises (default: raise the limit, resize in the dataset,
            or ``oversize='drop'``).
    """
    check_oversize_policy(owner, oversize)
    lengths = np.asarray(lengths)
    over = np.flatnonzero(lengths > max_len)
    if len(over) and oversize == 'error':
        i = int(over[0])
        what = describe(i) if describe else f'index {i} has {int(lengths[i])} tokens'
        raise ValueError(
            f'{owner}: {what}, more than {budget or f"max_tokens={max_len}"} ({len(over)} of '
            f'{len(lengths)} images exceed it); '
            + (remedy or "raise it, resize them in the dataset, or set oversize='drop'"))
    return over
