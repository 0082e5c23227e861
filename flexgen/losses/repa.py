"""REPA's representation-alignment loss (Yu et al. 2024, "Representation Alignment for
Generation: Training Diffusion Transformers Is Easier Than You Think", eq. 8).

The hidden tokens of an early block, passed through a small projector ``h_phi``, are pulled
towards the patch features ``y`` of a frozen vision encoder, token by token:

    L_REPA = -1/B sum_b 1/N_b sum_n cos(y_{b,n}, h_phi(x_{b,n}))

(REPA's form: value in [-1, 1], ``-1`` when perfectly aligned; total loss
``L_diffusion + lambda * L_REPA`` with lambda = 0.5). NiT (Wang et al. 2025) uses
``1 - cos`` averaged over all tokens of its pack (no per-image mean) with weight 1.0; the
constant 1 changes the value, not the gradient.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexgen.registry import MODELS
from .reduction import REDUCTIONS, jagged_mean

FORMS = ('neg_cos', 'one_minus_cos')


def token_cosine(projected: Tensor, target: Tensor) -> Tensor:
    """Cosine similarity of every row pair, ``[N, z] x [N, z] -> [N]``, in float32 (rows are
    L2-normalised first, as REPA does, so a zero row gives 0, never NaN)."""
    if projected.shape != target.shape or projected.dim() != 2:
        raise ValueError(f'token_cosine: expected two [N, z] tensors of one shape, got '
                         f'{tuple(projected.shape)} and {tuple(target.shape)}')
    a = F.normalize(projected.float(), dim=-1)
    b = F.normalize(target.float(), dim=-1)
    return (a * b).sum(-1)


def repa_alignment_loss(projected: Tensor, target: Tensor, seqlens: Optional[Tensor] = None,
                        reduction: str = 'image', form: str = 'neg_cos',
                        normalizer=None) -> Tensor:
    """The unweighted alignment loss of one encoder (a scalar, float32).

    Args:
        projected: ``[N, z]`` projected hidden tokens of a jagged batch (images concatenated).
        target: ``[N, z]`` the encoder's patch features, same token order.
        seqlens: ``[B]`` tokens per image (needed for ``reduction='image'``).
        reduction: ``'image'`` (mean over each image's tokens, then over images: REPA) or
            ``'token'`` (mean over all N tokens: NiT's packs).
        form: ``'neg_cos'`` (``-cos``: REPA) or ``'one_minus_cos'`` (``1 - cos``: NiT).
        normalizer: divides the summed cosines instead of the local count (the global
            count per rank under data parallelism, see :mod:`flexgen.losses.reduction`).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f'repa_alignment_loss: reduction must be one of {REDUCTIONS}, '
                         f'got {reduction!r}')
    if form not in FORMS:
        raise ValueError(f'repa_alignment_loss: form must be one of {FORMS}, got {form!r}')
    cos = token_cosine(projected, target)
    if reduction == 'image':
        if seqlens is None:
            raise ValueError("repa_alignment_loss: reduction='image' needs seqlens")
        if int(torch.as_tensor(seqlens).sum()) != cos.shape[0]:
            raise ValueError(f'repa_alignment_loss: seqlens sum to '
                             f'{int(torch.as_tensor(seqlens).sum())} but there are '
                             f'{cos.shape[0]} tokens')
    mean_cos = jagged_mean(cos, seqlens, reduction, normalizer=normalizer)
    return -mean_cos if form == 'neg_cos' else 1 - mean_cos


@MODELS.register_module()
class REPALoss(nn.Module):
    """``weight * L_REPA`` (see the module docstring), averaged over encoders.

    With several encoders (REPA's ``--enc-type a,b``) the per-encoder losses are averaged
    (REPA divides the sum by the number of encoders; NiT uses one encoder).

    Args:
        weight: lambda (REPA: 0.5; NiT: 1.0).
        reduction: ``'image'`` (REPA) or ``'token'`` (NiT).
        form: ``'neg_cos'`` (REPA) or ``'one_minus_cos'`` (NiT).
    """

    def __init__(self, weight: float = 0.5, reduction: str = 'image', form: str = 'neg_cos'):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f'REPALoss: reduction must be one of {REDUCTIONS}, got {reduction!r}')
        if form not in FORMS:
            raise ValueError(f'REPALoss: form must be one of {FORMS}, got {form!r}')
        self.weight, self.reduction, self.form = float(weight), reduction, form

    def forward(self, projected, targets, seqlens=None, normalizers=None) -> Tensor:
        """``projected`` / ``targets``: a ``[N, z]`` tensor or one per encoder (lists);
        ``normalizers``: ``{'token': ..., 'image': ...}`` counts to divide by (the global
        batch's, see :func:`flexgen.losses.reduction.global_counts`), default local."""
        if isinstance(projected, Tensor):
            projected, targets = [projected], [targets]
        if len(projected) != len(targets) or not projected:
            raise ValueError(f'REPALoss: {len(projected)} projections for {len(targets)} '
                             'encoder feature sets')
        normalizer = None if normalizers is None else normalizers[self.reduction]
        losses = [repa_alignment_loss(p, t, seqlens, self.reduction, self.form, normalizer)
                  for p, t in zip(projected, targets)]
        return self.weight * torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f'weight={self.weight}, reduction={self.reduction!r}, form={self.form!r}'
