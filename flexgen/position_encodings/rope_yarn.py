"""Ramp-blended RoPE scaling: NTK-by-parts (bloc97, 2023) and YaRN (Peng et al. 2023,
"YaRN: Efficient Context Window Extension of Large Language Models"), exactly as the FiT /
NiT code computes them with ``L = ori_max_pe_len`` and ``d = head_dim / 2``.

A frequency index ``i`` is classified by ``r(beta) = d ln(L / (2 pi beta)) / (2 ln theta)``
(the index that makes ``beta`` rotations over ``L`` positions):
``ramp_i = clamp((i - low) / (high - low), 0, 1)``, ``low = max(floor(r(beta_a)), 0)``,
``high = min(ceil(r(beta_b)), d - 1)``; indices below ``low`` (fast, high frequencies) keep
their frequency, indices above ``high`` are interpolated.
"""
import math

from flexgen.registry import POSITION_ENCODINGS

from .rope_scaling import (RoPEScaling, base_frequencies, blend, correction_range,
                           linear_ramp, ntk_frequencies)


@POSITION_ENCODINGS.register_module()
class YaRN(RoPEScaling):
    """YaRN: ``m_i = (1 - ramp_i) * extrapolation_factor`` over ``(r(beta_fast), r(beta_slow))``,
    ``w_i' = (w_i / s)(1 - m_i) + w_i m_i``, and the attention temperature
    ``sqrt(1/t) = 0.1 ln(s_max) + 1`` (1 when ``s_max <= 1``) multiplied onto cos and sin,
    ``s_max = max(max(h, w) / L, 1)`` (never decoupled). Logits scale by its square.

    Args:
        beta_fast, beta_slow: rotation counts bounding the ramp (YaRN's 32 and 1).
        extrapolation_factor: weight of the kept frequencies (1 in every reference).
        mscale_coeff: the 0.1 of ``0.1 ln(s) + 1``.
    """

    def __init__(self, ori_max_pe_len=None, decouple=False, beta_fast=32.0, beta_slow=1.0,
                 extrapolation_factor=1.0, mscale_coeff=0.1):
        super().__init__(ori_max_pe_len, decouple)
        self.beta_fast, self.beta_slow = float(beta_fast), float(beta_slow)
        self.extrapolation_factor = float(extrapolation_factor)
        self.mscale_coeff = float(mscale_coeff)

    def axis_frequencies(self, dim, theta, scale):
        base = base_frequencies(dim, theta)
        low, high = correction_range(self.beta_fast, self.beta_slow, dim,
                                     self.ori_max_pe_len, theta)
        keep = (1 - linear_ramp(low, high, dim // 2)) * self.extrapolation_factor
        return blend(base, base / scale, keep)

    def attention_factor(self, h, w):
        s = self.scale(max(h, w))
        return 1.0 if s <= 1 else self.mscale_coeff * math.log(s) + 1.0


@POSITION_ENCODINGS.register_module()
class NTKByParts(RoPEScaling):
    """NTK-by-parts (FiT's ``'ntk-by-parts'``, CLI ``partntk``): two ramps.
    ``m1 = 1 - ramp(r(beta_0), r(beta_1))`` blends interpolation into NTK-aware,
    ``f = (w / s)(1 - m1) + w_ntk m1``; ``m2 = 1 - ramp(r(gamma_0), r(gamma_1))`` blends
    that into the plain frequencies, ``w' = f (1 - m2) + w m2``. No attention factor.

    Args:
        beta_0, beta_1: bounds of the first ramp (1.25, 0.75).
        gamma_0, gamma_1: bounds of the second ramp (16, 2).
    """

    def __init__(self, ori_max_pe_len=None, decouple=False, beta_0=1.25, beta_1=0.75,
                 gamma_0=16.0, gamma_1=2.0):
        super().__init__(ori_max_pe_len, decouple)
        self.beta_0, self.beta_1 = float(beta_0), float(beta_1)
        self.gamma_0, self.gamma_1 = float(gamma_0), float(gamma_1)

    def axis_frequencies(self, dim, theta, scale):
        base = base_frequencies(dim, theta)
        n, length = dim // 2, self.ori_max_pe_len
        keep_ntk = 1 - linear_ramp(*correction_range(self.beta_0, self.beta_1, dim, length,
                                                     theta), n)
        keep_base = 1 - linear_ramp(*correction_range(self.gamma_0, self.gamma_1, dim, length,
                                                      theta), n)
        mixed = blend(ntk_frequencies(dim, theta, scale), base / scale, keep_ntk)
        return blend(base, mixed, keep_base)
