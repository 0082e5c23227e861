"""Position Interpolation for RoPE (Chen et al. 2023, "Extending Context Window of Large
Language Models via Positional Interpolation"): ``f'(x, m) = f(x, m / s)``, i.e. every
frequency divided by the scale, ``w_i' = w_i / s``. FiT's ``'linear'``."""
from flexgen.registry import POSITION_ENCODINGS

from .rope_scaling import RoPEScaling, base_frequencies


@POSITION_ENCODINGS.register_module()
class PositionInterpolation(RoPEScaling):
    """``w_i' = theta^(-2i/d) / s`` with ``s = max(target / ori_max_pe_len, 1)``."""

    def axis_frequencies(self, dim, theta, scale):
        return base_frequencies(dim, theta) / scale
