"""Collate dataset items into the model's input: images stay a list (their sizes differ)."""
import logging
from numbers import Integral, Number
from typing import List, Optional, Sequence

import numpy as np
import torch
from mmengine.logging import print_log

from flexgen.registry import FUNCTIONS
from flexgen.structures import ImageGroups, patchify

from .base_sampler import positive_int, refuse_unknown
from .packing.lengths import find_oversize, kept_mask, token_counts


def _collate_values(key: str, values: list):
    """One ``data_samples`` field of every item -> one batched value."""
    first = values[0]
    if all(v is None for v in values):
        return None
    if all(isinstance(v, np.ndarray) for v in values) or (
            all(isinstance(v, torch.Tensor) for v in values)
            and len({tuple(v.shape) for v in values}) > 1):
        shapes = {tuple(v.shape) for v in values}
        if len({len(shape) for shape in shapes}) != 1 or len(first.shape) != 3:
            raise ValueError(f"jagged_collate: data_samples['{key}'] holds arrays of shapes "
                             f'{sorted(shapes)}; only images (3-D) of several sizes are '
                             'grouped, other tensors must share one shape to be stacked')
        return ImageGroups.from_items(values)  # e.g. REPA's clean images
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise ValueError(f"jagged_collate: data_samples['{key}'] mixes tensors and "
                             f'{sorted({type(v).__name__ for v in values})}')
        return torch.stack(values)
    if all(isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.bool)
    if all(isinstance(v, Integral) for v in values):
        return torch.tensor(values, dtype=torch.long)
    if all(isinstance(v, Number) for v in values):
        return torch.tensor(values, dtype=torch.float32)
    if all(isinstance(v, (tuple, list)) and all(isinstance(x, Number) for x in v)
           for v in values):
        if len({len(v) for v in values}) != 1:
            raise ValueError(f"jagged_collate: data_samples['{key}'] holds sequences of "
                             f'different lengths: {values}')
        integral = all(isinstance(x, Integral) for v in values for x in v)
        return torch.tensor(values, dtype=torch.long if integral else torch.float32)
    return list(values)  # strings, dicts, ...: kept per item


@FUNCTIONS.register_module()
def jagged_collate(items: Sequence[dict], patch_size: Optional[int] = None,
                   max_length: Optional[int] = None, oversize: str = 'error',
                   **kwargs) -> dict:
    """Items ``dict(inputs, data_samples=dict(...))`` -> one batch for the model.

    - ``inputs``: with ``patch_size``, a :class:`~flexgen.structures.TokenBatch` of the
      items' tensors patchified, its geometry (positions, ``cu_seqlens``, segment plans)
      built here, in the data workers, so the training step only moves it to the device
      (set the dataloader's ``pin_memory=True`` on GPUs: the copies then never block).
      Without ``patch_size``, the list of the items' tensors, NOT stacked (a jagged batch:
      sizes may differ); ``None`` when every item has ``inputs=None`` (generation requests).
    - ``data_samples``: a dict; each key collated over the items: ints -> ``LongTensor [B]``,
      floats -> ``float32 [B]``, bools -> ``bool [B]``, tensors of one shape ->
      ``torch.stack``, images (tensors ``[C, H, W]`` of several sizes, or uint8 arrays
      ``[H, W, C]``) -> :class:`~flexgen.structures.ImageGroups` (stacked per size), tuples /
      lists of numbers -> ``[B, k]`` (long if all ints), anything else -> a list.

    ``max_length`` (with ``patch_size``) is the most tokens ``(H // p) * (W // p)`` one image
    may hold: FiT's context length (256; 1024 for its high-resolution fine-tune), which its
    RoPE and attention cost were sized for. FiT pads every image to it; here the model
    gets the jagged batch with no pad tokens (an attention backend that wants a rectangle
    pads inside, to the longest image of the batch, as FiT's training loop truncates its
    padded batch), and FiT's masked loss, a mean over each image's tokens then over the
    images, is ``DiffusionGenerator(loss_reduction='image')``. An image over
    ``max_length`` raises a ValueError naming its dataset index (``oversize='error'``), or
    is left out of the batch with a logged count (``'drop'``; a batch left empty raises).

    Configs name it ``collate_fn=dict(type='flexgen.jagged_collate', patch_size=2)``
    (mmengine looks collate functions up in its root FUNCTIONS registry; the prefix
    selects flexgen's); ``patch_size`` must be the model's.
    """
    refuse_unknown('jagged_collate', kwargs, dict(overflow='oversize'))
    if len(items) == 0:
        raise ValueError('jagged_collate: got an empty batch')
    inputs: List = [item['inputs'] for item in items]
    if all(x is None for x in inputs):
        inputs = None
    elif not all(isinstance(x, torch.Tensor) for x in inputs):
        kinds = sorted({type(x).__name__ for x in inputs})
        raise ValueError(f'jagged_collate: inputs must be all tensors or all None, got {kinds}')
    if max_length is not None:
        items = _within_length(items, patch_size, max_length, oversize)
        inputs = [item['inputs'] for item in items]
    if inputs is not None and patch_size is not None:
        inputs = patchify(inputs, patch_size)
        inputs.geometry.build()
    samples = [item['data_samples'] for item in items]
    keys = list(samples[0])
    for j, sample in enumerate(samples):
        if set(sample) != set(keys):
            raise ValueError(f'jagged_collate: item {j} has data_samples keys {sorted(sample)}, '
                             f'item 0 has {sorted(keys)}')
    return dict(inputs=inputs,
                data_samples={key: _collate_values(key, [s[key] for s in samples])
                              for key in keys})


def _within_length(items: Sequence[dict], patch_size, max_length, oversize: str) -> list:
    """The items of at most ``max_length`` tokens; the others refused or dropped (logged)."""
    name = 'jagged_collate'
    positive_int(name, 'max_length', max_length)
    if patch_size is None:
        raise ValueError(f'{name}: max_length={max_length} counts tokens: give patch_size too')
    p = positive_int(name, 'patch_size', patch_size)
    shapes = []
    for j, item in enumerate(items):
        x = item['inputs']
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'{name}: max_length needs inputs Tensor[C, H, W], item {j} has '
                             f'{shape}')
        shapes.append(tuple(x.shape[1:]))
    tokens = token_counts(shapes, p)

    def describe(j):
        index = items[j].get('data_samples', {}).get('index', f'(batch position {j})')
        return (f'index {index} ({shapes[j][0]}x{shapes[j][1]}) has {int(tokens[j])} tokens '
                f'(patch_size {p})')

    over = find_oversize(tokens, max_length, oversize, name, describe,
                         budget=f'max_length={max_length}',
                         remedy="raise max_length, resize the data, or set oversize='drop'")
    if len(over) == 0:
        return list(items)
    if len(over) == len(items):
        raise ValueError(f'{name}: every image of the batch exceeds max_length={max_length} '
                         f'tokens ({describe(int(over[0]))}); raise max_length or resize the '
                         'data')
    print_log(f'{name}: dropped {len(over)} of {len(items)} images longer than '
              f'max_length={max_length} tokens (' + '; '.join(describe(int(j)) for j in over[:4])
              + ')', logger='current', level=logging.WARNING)
    return [item for item, kept in zip(items, kept_mask(len(items), over)) if kept]
