from .rope import AxialRoPE2D, apply_rotary, rotate_half
from .rope_interpolation import PositionInterpolation
from .rope_ntk import DynamicNTK, NTKAware
from .rope_proportional import NTKPro1, NTKPro2, ProportionScale1, ProportionScale2
from .rope_scaling import REFERENCE_NAMES, Extrapolation, RoPEScaling, build_rope_rule
from .rope_yarn import NTKByParts, YaRN
from .sincos import SinCos2D, sincos_1d

__all__ = ['AxialRoPE2D', 'apply_rotary', 'rotate_half', 'PositionInterpolation', 'DynamicNTK',
           'NTKAware', 'NTKPro1', 'NTKPro2', 'ProportionScale1', 'ProportionScale2',
           'REFERENCE_NAMES', 'Extrapolation', 'RoPEScaling', 'build_rope_rule', 'NTKByParts',
           'YaRN', 'SinCos2D', 'sincos_1d']
