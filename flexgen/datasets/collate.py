"""Collate dataset items into the model's input: images stay a list (their sizes differ)."""
from numbers import Integral, Number
from typing import List, Sequence

import torch

from flexgen.registry import FUNCTIONS


def _collate_values(key: str, values: list):
    """One ``data_samples`` field of every item -> one batched value."""
    first = values[0]
    if all(v is None for v in values):
        return None
    if isinstance(first, torch.Tensor):
        shapes = {tuple(v.shape) for v in values if isinstance(v, torch.Tensor)}
        if len(shapes) != 1 or not all(isinstance(v, torch.Tensor) for v in values):
            raise ValueError(f"jagged_collate: data_samples['{key}'] must be tensors of one "
                             f'shape to be stacked, got shapes {sorted(shapes)}')
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
def jagged_collate(items: Sequence[dict]) -> dict:
    """Items ``dict(inputs, data_samples=dict(...))`` -> one batch for the model.

    - ``inputs``: the list of the items' tensors, NOT stacked (a jagged batch: sizes may
      differ), or ``None`` when every item has ``inputs=None`` (generation requests).
    - ``data_samples``: a dict; each key collated over the items: ints -> ``LongTensor [B]``,
      floats -> ``float32 [B]``, bools -> ``bool [B]``, tensors -> ``torch.stack``, tuples /
      lists of numbers -> ``[B, k]`` (long if all ints), anything else -> a list.

    Configs name it ``collate_fn=dict(type='flexgen.jagged_collate')`` (mmengine looks
    collate functions up in its root FUNCTIONS registry; the prefix selects flexgen's).
    """
    if len(items) == 0:
        raise ValueError('jagged_collate: got an empty batch')
    inputs: List = [item['inputs'] for item in items]
    if all(x is None for x in inputs):
        inputs = None
    elif not all(isinstance(x, torch.Tensor) for x in inputs):
        kinds = sorted({type(x).__name__ for x in inputs})
        raise ValueError(f'jagged_collate: inputs must be all tensors or all None, got {kinds}')
    samples = [item['data_samples'] for item in items]
    keys = list(samples[0])
    for j, sample in enumerate(samples):
        if set(sample) != set(keys):
            raise ValueError(f'jagged_collate: item {j} has data_samples keys {sorted(sample)}, '
                             f'item 0 has {sorted(keys)}')
    return dict(inputs=inputs,
                data_samples={key: _collate_values(key, [s[key] for s in samples])
                              for key in keys})
