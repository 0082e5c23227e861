"""Extrapolation rules of 2D axial RoPE: the shared interface, and plain extrapolation.

A rule answers one question: for a target grid of ``h`` rows and ``w`` columns (in patches),
which rotary frequencies does each axis use, and by which factor are ``cos`` and ``sin``
multiplied? (That factor lands on both ``q`` and ``k``, so the attention logits scale by
its square: YaRN's temperature ``sqrt(1/t)``, FiT's ``ntkpro`` proportions.)

Notation used by every rule (FiT / NiT ``VisionRotaryEmbedding``):

- ``d``: rotary width of one axis (``head_dim / 2``); ``theta``: the RoPE base (10000);
- ``w_i = theta^(-2i/d)``, ``i = 0 .. d/2 - 1``: the plain frequencies;
- ``L = ori_max_pe_len``: the side (in patches) of the grid the model was trained on;
- scale of an axis ``s = max(target / L, 1)`` (never below 1, so a target inside the
  training grid leaves every rule equal to plain RoPE); ``decouple=True`` gives each
  axis its own scale ``(s_h, s_w) = (s(h), s(w))``, otherwise both use ``s(max(h, w))``.
  Attention factors are never decoupled (they depend on ``max(h, w)`` or ``h * w``).

A new rule subclasses :class:`RoPEScaling`, overrides :meth:`~RoPEScaling.axis_frequencies`
and / or :meth:`~RoPEScaling.attention_factor`, and registers in ``POSITION_ENCODINGS``.
Everything is computed in float64 on the CPU once per distinct target grid; the rotary
module casts the result to float32.
"""
import math

import torch

from flexgen.registry import POSITION_ENCODINGS

# The names the reference code uses (FiT/NiT ``custom_freqs`` and the sampling scripts'
# ``--interpolation`` choices), mapped to the registered rule types.
REFERENCE_NAMES = {
    'no': 'Extrapolation', 'none': 'Extrapolation', 'normal': 'Extrapolation',
    'linear': 'PositionInterpolation',
    'ntk-aware': 'NTKAware', 'dynntk': 'NTKAware',
    'ntk-by-parts': 'NTKByParts', 'partntk': 'NTKByParts',
    'yarn': 'YaRN',
    'ntk-aware-pro1': 'NTKPro1', 'ntkpro1': 'NTKPro1',
    'ntk-aware-pro2': 'NTKPro2', 'ntkpro2': 'NTKPro2',
    'scale1': 'ProportionScale1', 'scale2': 'ProportionScale2',
}


def base_frequencies(dim, theta):
    """Plain RoPE frequencies ``theta^(-2i/dim)``, ``i = 0 .. dim/2 - 1``, float64."""
    return float(theta) ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def ntk_frequencies(dim, theta, scale):
    """NTK-aware frequencies (bloc97): the base becomes ``theta * s^(d/(d-2))``, so the
    highest frequency is kept and the lowest is divided by exactly ``s``."""
    if dim <= 2:
        raise ValueError(f'NTK scaling needs a per-axis rotary width d > 2 (got d = {dim}, '
                         f'i.e. head_dim = {2 * dim})')
    return base_frequencies(dim, theta * scale ** (dim / (dim - 2)))


def correction_index(beta, dim, length, theta):
    """YaRN's ``r(beta) = d ln(L / (2 pi beta)) / (2 ln theta)``: the (fractional) index of
    the frequency that makes ``beta`` full rotations over ``length`` positions."""
    return dim * math.log(length / (2 * math.pi * beta)) / (2 * math.log(theta))


def correction_range(beta_low, beta_high, dim, length, theta):
    """``(max(floor(r(beta_low)), 0), min(ceil(r(beta_high)), d - 1))`` (YaRN)."""
    low = math.floor(correction_index(beta_low, dim, length, theta))
    high = math.ceil(correction_index(beta_high, dim, length, theta))
    return max(low, 0), min(high, dim - 1)


def linear_ramp(low, high, n):
    """``clamp((i - low) / (high - low), 0, 1)`` for ``i = 0 .. n-1``; ``high`` gets
    ``+0.001`` when the two bounds meet (YaRN's ``linear_ramp_mask``)."""
    if low == high:
        high += 0.001
    return ((torch.arange(n, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)


def blend(outer, inner, keep):
    """``inner * (1 - keep) + outer * keep``, written so that ``outer == inner`` gives
    ``inner`` bit for bit (a rule at scale 1 then equals plain RoPE exactly)."""
    return inner + (outer - inner) * keep


class RoPEScaling:
    """Base of the extrapolation rules (see the module docstring for the notation).

    Args:
        ori_max_pe_len: side ``L`` of the training grid in patches (FiT / FiTv2: 16 for
            256 x 256 images with an 8x VAE and patch 2).
        decouple: one scale per axis (``s(h)``, ``s(w)``) instead of ``s(max(h, w))``.
    """
    requires_length = True

    def __init__(self, ori_max_pe_len=None, decouple=False):
        name = type(self).__name__
        if ori_max_pe_len is None and self.requires_length:
            raise ValueError(f'{name}: ori_max_pe_len is required: the side of the training '
                             'grid in patches (e.g. 16 for FiT at 256x256)')
        if ori_max_pe_len is not None and not ori_max_pe_len > 0:
            raise ValueError(f'{name}: ori_max_pe_len must be positive, got {ori_max_pe_len}')
        self.ori_max_pe_len = ori_max_pe_len
        self.decouple = bool(decouple)

    # ---------------------------------------------------------------- what a rule overrides
    def axis_frequencies(self, dim, theta, scale):
        """Frequencies ``[dim/2]`` (float64) of one axis whose scale is ``scale``."""
        return base_frequencies(dim, theta)

    def attention_factor(self, h, w):
        """Factor on ``cos`` and ``sin`` for a ``h x w`` target (logits scale by its square)."""
        return 1.0

    # ---------------------------------------------------------------- shared
    def scale(self, length):
        """``max(length / L, 1)``; 1 without a training length (plain extrapolation)."""
        if self.ori_max_pe_len is None:
            return 1.0
        return max(length / self.ori_max_pe_len, 1.0)

    def axis_scales(self, h, w):
        """``(s_rows, s_cols)``: decoupled per axis or both from the longer side."""
        if self.decouple:
            return self.scale(h), self.scale(w)
        s = self.scale(max(h, w))
        return s, s

    def tables(self, h, w, dim, theta):
        """``(row_freqs, col_freqs, factor)`` for a target grid of ``h`` rows, ``w`` columns."""
        s_rows, s_cols = self.axis_scales(h, w)
        rows = self.axis_frequencies(dim, theta, s_rows)
        cols = rows if s_cols == s_rows else self.axis_frequencies(dim, theta, s_cols)
        return rows, cols, float(self.attention_factor(h, w))

    def __repr__(self):
        args = ', '.join(f'{k}={v!r}' for k, v in vars(self).items())
        return f'{type(self).__name__}({args})'


@POSITION_ENCODINGS.register_module()
class Extrapolation(RoPEScaling):
    """Plain RoPE at any size (positions simply run past the training grid): FiT's
    ``'normal'`` / CLI ``no``. Kept as a rule so a config can name it explicitly."""
    requires_length = False


def build_rope_rule(cfg):
    """A rule from ``None`` (plain RoPE), a rule object, or a config dict whose ``type``
    is a registered name or one of the reference names in :data:`REFERENCE_NAMES`."""
    if cfg is None or isinstance(cfg, RoPEScaling):
        return cfg
    if isinstance(cfg, str):
        cfg = dict(type=cfg)
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise TypeError(f'AxialRoPE2D: rule must be None or a dict with a type, got {cfg!r}')
    cfg = dict(cfg)
    if isinstance(cfg['type'], str):
        cfg['type'] = REFERENCE_NAMES.get(cfg['type'], cfg['type'])
    rule = POSITION_ENCODINGS.build(cfg)
    if not isinstance(rule, RoPEScaling):
        raise TypeError(f"AxialRoPE2D: rule type {cfg['type']!r} is not a RoPE extrapolation "
                        f'rule (got {type(rule).__name__})')
    return rule
