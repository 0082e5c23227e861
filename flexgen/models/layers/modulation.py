"""Adaptive LayerNorm modulation (DiT's adaLN-Zero, FiTv2's AdaLN-LoRA).

The modulation is computed once per image (``[B, k*D]``) and broadcast to that image's
tokens inside the elementwise ops: never a linear layer per token.
"""
import torch.nn as nn

from flexgen.registry import MODELS


@MODELS.register_module()
class AdaLNZero(nn.Sequential):
    """``SiLU -> Linear(D, k*D)``, the last layer zero-initialised by the backbone
    (so every block starts as the identity: DiT, section 3.2)."""

    def __init__(self, hidden_size, num_chunks=6, bias=True):
        super().__init__(nn.SiLU(), nn.Linear(hidden_size, num_chunks * hidden_size, bias=bias))


@MODELS.register_module()
class AdaLNLoRA(nn.Sequential):
    """``SiLU -> Linear(D, r) -> Linear(r, k*D)``: a rank-``r`` factorised adaLN
    (FiTv2, Wang et al. 2024, section 3.3; NiT-XXL)."""

    def __init__(self, hidden_size, rank, num_chunks=6, bias=True):
        super().__init__(nn.SiLU(), nn.Linear(hidden_size, rank, bias=bias),
                         nn.Linear(rank, num_chunks * hidden_size, bias=bias))


def modulate(x, shift, scale, batch):
    """``x * (1 + scale) + shift`` with per-image ``shift, scale`` ``[B, D]``."""
    if batch.is_uniform:
        xb = batch.dense(x)
        return (xb * (1 + scale[:, None]) + shift[:, None]).view_as(x)
    return x * (1 + batch.per_token(scale)) + batch.per_token(shift)


def gate(x, g, batch):
    """``g * x`` with a per-image gate ``g`` ``[B, D]``."""
    if batch.is_uniform:
        return (batch.dense(x) * g[:, None]).view_as(x)
    return x * batch.per_token(g)
