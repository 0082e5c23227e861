"""Per-token losses of a jagged batch -> one number, normalised over the global batch.

Two reductions (``REDUCTIONS``):

- ``'image'``: ``1/B sum_i 1/n_i sum_{tokens of i} l`` (each image weighs the same: DiT,
  FiT, REPA);
- ``'token'``: ``1/N sum_tokens l`` (each token weighs the same: NiT's packs).

Under data parallelism every rank holds a part of the batch and DDP *averages* the ranks'
gradients. Dividing by the rank's own count would weigh tokens (or images) of a small pack
more than those of a large one; dividing by the global count per rank,
``N_global / world_size``, makes the averaged gradient exactly that of the whole batch, so
``W`` ranks equal one process holding all their data. :func:`global_counts` all-reduces
the two counts once per step.
"""
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor

REDUCTIONS = ('image', 'token')


def global_counts(num_tokens: int, num_images: int, device,
                  distributed: Optional[bool] = None) -> Dict[str, object]:
    """``{'token': N, 'image': B}`` to divide by: the local counts, or, in a distributed
    run, the global counts divided by the world size (one all-reduce)."""
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and \
            dist.get_world_size() > 1
    if not distributed:
        return dict(token=float(num_tokens), image=float(num_images))
    counts = torch.tensor([num_tokens, num_images], dtype=torch.float32, device=device)
    dist.all_reduce(counts)
    counts /= dist.get_world_size()
    return dict(token=counts[0], image=counts[1])


def jagged_mean(values: Tensor, seqlens: Tensor, reduction: str,
                image_ids: Optional[Tensor] = None, normalizer=None) -> Tensor:
    """Reduce per-token ``values`` ``[N]`` of images of ``seqlens`` ``[B]`` tokens.

    ``normalizer`` replaces the local count (``N`` or ``B``) in the final division, e.g.
    one of :func:`global_counts`; ``image_ids`` ``[N]`` (which image each token is of) is
    derived from ``seqlens`` when not given.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}')
    if reduction == 'token':
        total, count = values.sum(), values.shape[0]
    else:
        seqlens = torch.as_tensor(seqlens, device=values.device)
        if image_ids is None:
            image_ids = torch.repeat_interleave(
                torch.arange(len(seqlens), device=values.device), seqlens,
                output_size=values.shape[0])
        per_image = torch.zeros(len(seqlens), device=values.device, dtype=values.dtype)
        per_image.index_add_(0, image_ids, values)
        total, count = (per_image / seqlens).sum(), len(seqlens)
    return total / (count if normalizer is None else normalizer)
