"""Adaptive LayerNorm modulation (DiT's adaLN-Zero, FiTv2's AdaLN-LoRA).

The modulation is computed once per image (``[B, k*D]``) and broadcast to that image's
tokens inside the elementwise ops: never a linear layer per token, and no per-token copy
of it kept for backward.
"""
import torch
import torch.nn as nn

from flexgen.registry import MODELS


def zero_linear(layer: nn.Linear) -> None:
    """Zero a linear layer's weight and bias."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


@MODELS.register_module()
class AdaLNZero(nn.Sequential):
    """``SiLU -> Linear(D, k*D)``; :meth:`init_weights` zeroes the linear layer, so every
    block starts as the identity (DiT, section 3.2)."""

    def __init__(self, hidden_size, num_chunks=6, bias=True):
        super().__init__(nn.SiLU(), nn.Linear(hidden_size, num_chunks * hidden_size, bias=bias))

    def init_weights(self):
        zero_linear(self[-1])


@MODELS.register_module()
class AdaLNLoRA(nn.Sequential):
    """``SiLU -> Linear(D, r) -> Linear(r, k*D)``: a rank-``r`` factorised adaLN
    (FiTv2, Wang et al. 2024, section 3.3; NiT-XXL); :meth:`init_weights` zeroes the
    output layer (adaLN-Zero)."""

    def __init__(self, hidden_size, rank, num_chunks=6, bias=True):
        super().__init__(nn.SiLU(), nn.Linear(hidden_size, rank, bias=bias),
                         nn.Linear(rank, num_chunks * hidden_size, bias=bias))

    def init_weights(self):
        zero_linear(self[-1])


class _PerImageMulAdd(torch.autograd.Function):
    """``x * a[ids] + b[ids]`` (``b`` optional) for per-image ``a, b`` ``[B, D]`` and
    per-token ``x`` ``[N, D]``, keeping only ``x`` and ``a`` for backward: autograd on the
    gathered ``[N, D]`` copies would keep one of them alive per use until backward
    (four per block: two modulations, two gates)."""

    @staticmethod
    def forward(ctx, x, a, b, ids):
        a_tok = a.index_select(0, ids)
        out = x * a_tok if b is None else torch.addcmul(b.index_select(0, ids), x, a_tok)
        ctx.save_for_backward(x, a, ids)
        ctx.has_b = b is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, a, ids = ctx.saved_tensors
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad * a.index_select(0, ids)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_a = _sum_per_image(grad * x, ids, a)
        if ctx.has_b and ctx.needs_input_grad[2]:
            grad_b = _sum_per_image(grad, ids, a)
        return grad_x, grad_a, grad_b, None


def _sum_per_image(values, ids, like):
    """Sum the rows of ``values`` ``[N, D]`` per image (float32 accumulation), ``like``'s
    shape and dtype."""
    total = torch.zeros(like.shape, dtype=torch.promote_types(values.dtype, torch.float32),
                        device=values.device)
    return total.index_add_(0, ids, values.to(total.dtype)).to(like.dtype)


def modulate(x, shift, scale, batch):
    """``x * (1 + scale) + shift`` with per-image ``shift, scale`` ``[B, D]``."""
    if batch.is_uniform:
        xb = batch.dense(x)
        return (xb * (1 + scale[:, None]) + shift[:, None]).view_as(x)
    return _PerImageMulAdd.apply(x, 1 + scale, shift, batch.image_ids)


def gate(x, g, batch):
    """``g * x`` with a per-image gate ``g`` ``[B, D]``."""
    if batch.is_uniform:
        return (batch.dense(x) * g[:, None]).view_as(x)
    return _PerImageMulAdd.apply(x, g, None, batch.image_ids)
