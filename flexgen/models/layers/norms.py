"""Normalisation layers by name, for QK-norm and the blocks."""
import torch.nn as nn


def build_norm(kind, dim, eps=1e-6):
    """``None`` -> identity; ``'layernorm'`` (no affine, FiTv2); ``'layernorm_affine'``
    (NiT's per-head LayerNorm with weight and bias); ``'rmsnorm'`` (with weight)."""
    if kind is None:
        return nn.Identity()
    if kind == 'layernorm':
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=False, bias=False)
    if kind == 'layernorm_affine':
        return nn.LayerNorm(dim, eps=eps)
    if kind == 'rmsnorm':
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm '{kind}': expected None, 'layernorm', "
                     "'layernorm_affine' or 'rmsnorm'")
