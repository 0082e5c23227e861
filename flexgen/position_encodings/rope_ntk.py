"""NTK-aware RoPE scaling (bloc97, 2023) and its dynamic form (emozilla; HF transformers
``_compute_dynamic_ntk_parameters``): change the base instead of the positions,
``theta' = theta * s^(d/(d-2))``, ``w_i' = theta'^(-2i/d)``."""
from flexgen.registry import POSITION_ENCODINGS

from .rope_scaling import RoPEScaling, ntk_frequencies


@POSITION_ENCODINGS.register_module()
class NTKAware(RoPEScaling):
    """FiT's ``'ntk-aware'`` (CLI ``dynntk``): ``theta' = theta * s^(d/(d-2))`` with the
    scale ``s = max(target / ori_max_pe_len, 1)`` of each image's target grid. The highest
    frequency is unchanged, the lowest is divided by exactly ``s``. This is also FiTv2's
    high-resolution fine-tuning rule (per image, decoupled)."""

    def axis_frequencies(self, dim, theta, scale):
        return ntk_frequencies(dim, theta, scale)


@POSITION_ENCODINGS.register_module()
class DynamicNTK(RoPEScaling):
    """Dynamic NTK as in HF transformers: for a target length ``l`` the base becomes
    ``theta * (factor * l / L - (factor - 1))^(d/(d-2))`` once ``l > L`` (unchanged before).
    ``factor = 1`` is exactly :class:`NTKAware`; a larger ``factor`` scales more steeply.

    Args:
        factor: HF's ``rope_scaling['factor']`` (alpha).
    """

    def __init__(self, ori_max_pe_len=None, decouple=False, factor=1.0):
        super().__init__(ori_max_pe_len, decouple)
        if not factor >= 1:
            raise ValueError(f'DynamicNTK: factor must be >= 1, got {factor}')
        self.factor = float(factor)

    def scale(self, length):
        length = max(length, self.ori_max_pe_len)
        return self.factor * length / self.ori_max_pe_len - (self.factor - 1)

    def axis_frequencies(self, dim, theta, scale):
        return ntk_frequencies(dim, theta, scale)
