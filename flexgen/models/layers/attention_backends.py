"""Attention backends: block-diagonal attention over a jagged token batch.

Every backend computes, for each image i of a :class:`~flexgen.structures.TokenBatch`,
``softmax(q_i k_i^T * scale) v_i`` on that image's tokens only. They differ only in how:

- ``sdpa``: one dense batched ``scaled_dot_product_attention`` when all images have the
  same length (DiT's case, no overhead); otherwise images are grouped by length and each
  group runs as one dense batch (cost ``sum n_i^2``, never ``(sum n_i)^2``).
- ``padded``: FiT's way: pad every image to the longest, mask, one SDPA call.
- ``per_image``: the plainest loop, one SDPA call per image (the reference the others are
  tested against).

A backend is a callable ``(q, k, v, batch) -> out`` on ``[N, heads, head_dim]`` tensors.
A new one is one class here (or in your own module) and one config line.
"""
from collections import defaultdict

import torch
import torch.nn.functional as F

from flexgen.registry import ATTENTION_BACKENDS


def _sdpa(q, k, v):
    """``[..., n, H, d]`` inputs -> ``[..., n, H, d]`` (SDPA wants heads before tokens)."""
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2),
                                         v.transpose(-3, -2))
    return out.transpose(-3, -2)


@ATTENTION_BACKENDS.register_module(name='per_image')
class PerImageAttention:
    """One dense SDPA call per image."""

    def __call__(self, q, k, v, batch):
        outs = [_sdpa(qi, ki, vi) for qi, ki, vi in
                zip(batch.split(q), batch.split(k), batch.split(v))]
        return torch.cat(outs) if outs else q.new_zeros(q.shape)


@ATTENTION_BACKENDS.register_module(name='sdpa')
class SDPAAttention:
    """Dense batched SDPA, grouping images of equal length into one call."""

    def __call__(self, q, k, v, batch):
        if batch.is_uniform:
            return _sdpa(batch.dense(q), batch.dense(k), batch.dense(v)).reshape(q.shape)
        groups = defaultdict(list)
        for i, n in enumerate(batch.seqlens_list):
            groups[n].append(i)
        q_parts, k_parts, v_parts = batch.split(q), batch.split(k), batch.split(v)
        outs = [None] * batch.num_images
        for ids in groups.values():
            o = _sdpa(torch.stack([q_parts[i] for i in ids]),
                      torch.stack([k_parts[i] for i in ids]),
                      torch.stack([v_parts[i] for i in ids]))
            for j, i in enumerate(ids):
                outs[i] = o[j]
        return torch.cat(outs)


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


def build_attention_backend(cfg):
    """A backend from a name (``'sdpa'``), a config dict, or a ready callable."""
    if isinstance(cfg, str):
        cfg = dict(type=cfg)
    if isinstance(cfg, dict):
        return ATTENTION_BACKENDS.build(cfg)
    return cfg
