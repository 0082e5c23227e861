"""NiT's sampler-meta files: a JSON list of packs, each a list of 0-based dataset indices
(data-meta line numbers), written by ``tools/pack_dataset.py`` and served by
:class:`~flexgen.datasets.OfflinePackSampler`."""
import json
import os.path as osp
from typing import List, Optional, Sequence

import numpy as np

from flexgen.fileio import atomic_write


def save_sampler_meta(packs: Sequence[Sequence[int]], path: str) -> None:
    """Write packs as NiT's sampler-meta JSON (an indented list of lists of ints),
    atomically."""
    text = json.dumps([[int(i) for i in pack] for pack in packs], indent=4)
    atomic_write(text.encode(), path)


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


def sampler_meta_path(data_meta: str, max_len: int) -> str:
    """NiT's naming: data_meta/<name>_meta.jsonl -> sampler_meta/<name>_LPFHP_<L>.json."""
    name = osp.basename(data_meta)
    for suffix in ('_meta.jsonl', '.jsonl'):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    root = osp.dirname(osp.dirname(osp.abspath(data_meta)))
    return osp.join(root, 'sampler_meta', f'{name}_LPFHP_{max_len}.json')


def check_sampler_meta(meta_file: str, lengths: Sequence[int],
                       max_len: Optional[int] = None) -> dict:
    """Coverage, duplicates, budget and fill of a sampler-meta file against the token
    counts ``lengths`` of its dataset."""
    lengths = np.asarray(lengths)
    packs = load_sampler_meta(meta_file)
    flat = np.fromiter((i for p in packs for i in p), np.int64)
    if flat.max() >= len(lengths):
        raise ValueError(f'{meta_file}: index {flat.max()} is beyond the {len(lengths)} images')
    loads = np.array([lengths[p].sum() for p in packs])
    result = dict(packs=len(packs), images=len(flat), unique=len(np.unique(flat)),
                  dataset=len(lengths), tokens=int(loads.sum()), largest_pack=int(loads.max()))
    if max_len:
        result.update(max_len=max_len, over_budget=int((loads > max_len).sum()),
                      efficiency=float(loads.sum() / (len(packs) * max_len)))
    return result
