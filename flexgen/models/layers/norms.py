"""Normalisation layers by name, for QK-norm and the blocks."""
import torch.nn as nn

_AFFINE_DEFAULT = dict(layernorm=False, layernorm_affine=True, rmsnorm=True)


def build_norm(kind, dim, eps=1e-6):
    """A normalisation over the last ``dim`` channels.

    ``kind``: ``None`` -> identity; ``'layernorm'`` (no affine: FiTv2's QK-norm);
    ``'layernorm_affine'`` (weight and bias: NiT's per-head LayerNorm); ``'rmsnorm'``
    (with weight). A dict ``dict(type='rmsnorm', affine=False, eps=1e-6)`` chooses the
    affine part and eps explicitly (FiT's ``qk_norm_weight`` switch).
    """
    if kind is None:
        return nn.Identity()
    cfg = dict(kind) if isinstance(kind, dict) else dict(type=kind)
    name = cfg.pop('type', None)
    if name not in _AFFINE_DEFAULT:
        raise ValueError(f"unknown norm {kind!r}: expected None, 'layernorm', "
                         "'layernorm_affine' or 'rmsnorm' (or a dict with one of these as "
                         "type, and optional affine / eps)")
    affine = cfg.pop('affine', _AFFINE_DEFAULT[name])
    eps = cfg.pop('eps', eps)
    if cfg:
        raise ValueError(f'norm {name!r}: unexpected options {sorted(cfg)} '
                         '(expected affine, eps)')
    if name == 'rmsnorm':
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=affine)
