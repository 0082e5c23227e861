"""Attention backends: block-diagonal attention over a jagged token batch.

Every backend computes, for each image i of a :class:`~flexgen.structures.TokenBatch`,
``softmax(q_i k_i^T * scale) v_i`` on that image's tokens only. They differ only in how:

- ``sdpa``: one dense batched ``scaled_dot_product_attention`` when all images have the
  same length (DiT's case, no overhead); otherwise images are grouped by length and each
  group runs as one dense batch (cost ``sum n_i^2``, never ``(sum n_i)^2``). The fastest
  CPU path.
- ``padded``: FiT's way: pad every image to the longest, mask, one SDPA call.
- ``per_image``: the plainest loop, one SDPA call per image (the reference the others are
  tested against).
- ``flex`` (``attention_flex.py``): torch FlexAttention with a document block mask.
- ``flash_varlen``, ``xformers`` (``attention_varlen.py``): the GPU varlen kernels, optional
  extras (``pip install flexgen[gpu]``).
- ``auto``: flash-attn on CUDA when installed, else the grouped ``sdpa``.

A backend is a callable ``(q, k, v, batch) -> out`` on ``[N, heads, head_dim]`` tensors.
A new one is one class here (or in your own module) and one config line.
"""
from collections import defaultdict
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from flexgen.registry import ATTENTION_BACKENDS


def _sdpa(q, k, v):
    """``[..., n, H, d]`` inputs -> ``[..., n, H, d]`` (SDPA wants heads before tokens; the
    transposes are views, and CPU / CUDA SDPA kernels read these strides directly)."""
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2),
                                         v.transpose(-3, -2))
    return out.transpose(-3, -2)


class LengthGroups(NamedTuple):
    """A jagged batch's images grouped by token count (computed once per batch).

    Group ``g`` holds ``counts[g]`` images of ``lengths[g]`` tokens each. ``order`` lists
    the token indices of group 0's images, then group 1's, ... (each image's tokens in
    order), so the tokens of a group are one contiguous ``[count * n]`` range of
    ``x[order]``; ``inverse`` undoes it. Both are ``None`` when the batch is already in
    that order (e.g. images sorted by length), which saves the two gathers.
    """
    lengths: List[int]
    counts: List[int]
    order: Optional[Tensor]
    inverse: Optional[Tensor]


def length_groups(batch) -> LengthGroups:
    """The :class:`LengthGroups` of ``batch``, cached on the batch: built once per batch
    (not once per layer), on the batch's device."""
    cache = batch.__dict__.setdefault('_attention_cache', {})
    key = ('length_groups', str(batch.device))
    if key not in cache:
        cache[key] = _build_length_groups(batch.seqlens_list, batch.device)
    return cache[key]


def _build_length_groups(seqlens, device):
    members = defaultdict(list)  # insertion order: groups in order of first appearance
    for i, n in enumerate(seqlens):
        members[n].append(i)
    lengths, counts = list(members), [len(ids) for ids in members.values()]
    image_order = [i for ids in members.values() for i in ids]
    if image_order == sorted(image_order):
        return LengthGroups(lengths, counts, None, None)
    starts = torch.zeros(len(seqlens), dtype=torch.long)
    starts[1:] = torch.cumsum(torch.tensor(seqlens[:-1]), 0)
    order = torch.cat([(starts[ids, None] + torch.arange(n)).flatten()
                       for n, ids in members.items()])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return LengthGroups(lengths, counts, order.to(device), inverse.to(device))


@ATTENTION_BACKENDS.register_module(name='per_image')
class PerImageAttention:
    """One dense SDPA call per image: the plainest loop, the reference for the others."""

    def __call__(self, q, k, v, batch):
        outs = [_sdpa(qi, ki, vi) for qi, ki, vi in
                zip(batch.split(q), batch.split(k), batch.split(v))]
        return torch.cat(outs) if outs else q.new_zeros(q.shape)


@ATTENTION_BACKENDS.register_module(name='sdpa')
class SDPAAttention:
    """Dense batched SDPA over images of equal length: cost ``sum n_i^2``, never
    ``(sum n_i)^2``, and one kernel call per distinct length instead of one per image.

    A uniform batch (DiT) is one batched call on views, no copy. Otherwise the tokens are
    gathered once so each length group is contiguous (:func:`length_groups`, cached on the
    batch for all layers), each group runs as one ``[count, heads, n, head_dim]`` call,
    and the outputs are concatenated and gathered back: a few ``O(N)`` copies in place of
    the per-image stacks and selects whose backward costs grow with the group size.
    """

    def __call__(self, q, k, v, batch):
        if batch.is_uniform:
            return _sdpa(batch.dense(q), batch.dense(k), batch.dense(v)).reshape(q.shape)
        groups = length_groups(batch)
        if groups.order is not None:
            q, k, v = (x.index_select(0, groups.order) for x in (q, k, v))
        outs, start = [], 0
        for n, count in zip(groups.lengths, groups.counts):
            end = start + n * count
            parts = (x[start:end].unflatten(0, (count, n)) for x in (q, k, v))
            outs.append(_sdpa(*parts).flatten(0, 1))
            start = end
        out = torch.cat(outs)
        return out if groups.order is None else out.index_select(0, groups.inverse)


@ATTENTION_BACKENDS.register_module(name='padded')
class PaddedAttention:
    """Pad every image to the longest and mask, as FiT does (Lu et al. 2024, section 3.2).

    :meth:`attend` is FiT's masked computation on a padded batch: valid tokens attend to
    valid tokens of their image, padded slots only to padded slots (``mask_i == mask_j``,
    so no softmax row is empty), and the output of padded slots is set to zero. Called as
    a backend it pads the jagged batch, attends, and returns the valid rows.
    """

    @staticmethod
    def pad(x, batch):
        """``[N, ...]`` -> ``([B, L, ...]`` zero-padded, ``valid`` ``[B, L]`` bool), with
        ``L`` the longest image; each image's tokens first, padding after them."""
        local = torch.arange(x.shape[0], device=x.device) - \
            batch.cu_seqlens[:-1].long()[batch.image_ids]
        index = (batch.image_ids, local)
        padded = x.new_zeros((batch.num_images, batch.max_seqlen) + tuple(x.shape[1:]))
        padded[index] = x
        valid = torch.zeros(batch.num_images, batch.max_seqlen, dtype=torch.bool,
                            device=x.device)
        valid[index] = True
        return padded, valid

    @staticmethod
    def attend(q, k, v, valid):
        """Masked attention on padded ``[B, L, heads, head_dim]`` with ``valid`` ``[B, L]``;
        padded rows of the output are zero."""
        mask = valid[:, None, :, None] == valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2) * valid[:, :, None, None].to(out.dtype)

    def __call__(self, q, k, v, batch):
        (qp, valid), (kp, _), (vp, _) = (self.pad(x, batch) for x in (q, k, v))
        return self.attend(qp, kp, vp, valid)[valid]


@ATTENTION_BACKENDS.register_module(name='auto')
class AutoAttention:
    """The fastest exact backend for the device and dtype of each call.

    - CUDA, float16 / bfloat16: ``'flash_varlen'`` when flash-attn is installed, else
      ``'xformers'`` when xformers is, else ``'sdpa'``;
    - everything else (CPU, float32 / float64 on CUDA): ``'sdpa'`` (grouped by length;
      the fastest CPU path in ``tools/benchmark.py``; ``'flex'`` has no CPU backward).

    Never the dense masked SDPA over the whole pack, which costs ``(sum n_i)^2``.
    """

    def __init__(self):
        self._chosen = {}

    @staticmethod
    def choose(device, dtype):
        """The backend name ``'auto'`` uses for tensors on ``device`` of ``dtype``."""
        if torch.device(device).type == 'cuda' and dtype in (torch.float16, torch.bfloat16):
            for name in ('flash_varlen', 'xformers'):
                try:
                    build_attention_backend(name)
                except ImportError:
                    continue
                return name
        return 'sdpa'

    def __call__(self, q, k, v, batch):
        key = (q.device.type, q.dtype)
        if key not in self._chosen:
            self._chosen[key] = build_attention_backend(self.choose(q.device, q.dtype))
        return self._chosen[key](q, k, v, batch)


def _register_optional_backends():
    # 'flex', 'flash_varlen' and 'xformers' live in their own modules (importable without
    # their kernels); make sure they are registered however this module was reached.
    from . import attention_flex, attention_varlen  # noqa: F401


def build_attention_backend(cfg):
    """A backend from a name (``'sdpa'``), a config dict, or a ready callable."""
    if isinstance(cfg, str):
        cfg = dict(type=cfg)
    if isinstance(cfg, dict):
        _register_optional_backends()
        return ATTENTION_BACKENDS.build(cfg)
    return cfg
