"""Collate dataset items into the model's input: images stay a list (their sizes differ)."""
import logging
from numbers import Integral, Number
from typing import List, Optional, Sequence

import numpy as np
import torch
from mmengine.logging import print_log

from flexgen.registry import FUNCTIONS
from flexgen.structures import ImageGroups, patchify


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
def jagged_collate(items: Sequence[dict], patch_size: Optional[int] = None) -> dict:
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

    Configs name it ``collate_fn=dict(type='flexgen.jagged_collate', patch_size=2)``
    (mmengine looks collate functions up in its root FUNCTIONS registry; the prefix
    selects flexgen's); ``patch_size`` must be the model's.
    """
    if len(items) == 0:
        raise ValueError('jagged_collate: got an empty batch')
    inputs: List = [item['inputs'] for item in items]
    if all(x is None for x in inputs):
        inputs = None
    elif not all(isinstance(x, torch.Tensor) for x in inputs):
        kinds = sorted({type(x).__name__ for x in inputs})
        raise ValueError(f'jagged_collate: inputs must be all tensors or all None, got {kinds}')
    elif patch_size is not None:
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


OVERFLOW_POLICIES = ('error', 'drop')


@FUNCTIONS.register_module()
def padded_collate(items: Sequence[dict], max_length: int = 256, patch_size: int = 2,
                   overflow: str = 'error') -> dict:
    """FiT's "pad every image to ``max_length`` tokens" (256; 1024 for the high-resolution
    fine-tune), as a jagged batch: :func:`jagged_collate` plus the mask of FiT's padded layout.

    Where the padding lives in flexgen: the model always receives a jagged
    :class:`~flexgen.structures.TokenBatch` (no pad tokens), and an attention backend that
    wants a rectangle (``'padded'``, FiT's own masked SDPA) pads inside, to the longest
    image of the batch, as FiT's training loop truncates its padded batch to
    ``max_b(h_b * w_b)`` tokens. Padding every image to ``max_length`` in the data would only
    move zeros around. So here ``max_length`` states what FiT's data pipeline states with
    it: the most tokens one image may hold (its context length, which its RoPE and
    attention cost were sized for). FiT's masked loss (mean over each image's valid tokens,
    then over images) is ``DiffusionGenerator(loss_reduction='image')`` on the jagged batch;
    the mask is added for code that wants FiT's padded view.

    Args:
        items: dataset items ``dict(inputs=Tensor[C, H, W], data_samples=dict(...))``.
        max_length: the most tokens ``(H // patch_size) * (W // patch_size)`` of one image.
        patch_size: the model's patch size (latent cells per token side).
        overflow: an image of more than ``max_length`` tokens raises a ValueError naming
            its dataset index (``'error'``), or is left out of the batch (``'drop'``; a
            batch left empty still raises).

    Returns:
        :func:`jagged_collate`'s dict (``inputs`` patchified with ``patch_size``, a
        :class:`~flexgen.structures.TokenBatch`), whose ``data_samples`` also holds ``mask``
        ``bool [B, max_length]`` (the first ``n_b`` positions True, FiT's layout) and
        ``num_tokens`` ``long [B]`` (``n_b``).
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f'padded_collate: max_length must be a positive int, got {max_length!r}')
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f'padded_collate: patch_size must be a positive int, got {patch_size!r}')
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f'padded_collate: overflow must be one of {OVERFLOW_POLICIES}, '
                         f'got {overflow!r}')
    if len(items) == 0:
        raise ValueError('padded_collate: got an empty batch')
    kept, counts, too_long = [], [], []
    for j, item in enumerate(items):
        x = item['inputs']
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'padded_collate: item {j} inputs must be a Tensor[C, H, W], '
                             f'got {shape}')
        n = (x.shape[1] // patch_size) * (x.shape[2] // patch_size)
        if n > max_length:
            index = item.get('data_samples', {}).get('index', f'(batch position {j})')
            too_long.append(f'index {index}: {x.shape[1]}x{x.shape[2]} = {n} tokens')
            continue
        kept.append(item)
        counts.append(n)
    if too_long and (overflow == 'error' or not kept):
        raise ValueError(f'padded_collate: {len(too_long)} of {len(items)} images exceed '
                         f'max_length={max_length} tokens at patch_size {patch_size} '
                         f'({"; ".join(too_long[:4])}); raise max_length, resize the data, '
                         "or pass overflow='drop'")
    if too_long:
        print_log(f'padded_collate: dropped {len(too_long)} of {len(items)} images longer than '
                  f'max_length={max_length} tokens ({"; ".join(too_long[:4])})',
                  logger='current', level=logging.WARNING)
    batch = jagged_collate(kept, patch_size)
    num_tokens = torch.tensor(counts, dtype=torch.long)
    batch['data_samples']['num_tokens'] = num_tokens
    batch['data_samples']['mask'] = torch.arange(max_length)[None, :] < num_tokens[:, None]
    return batch
