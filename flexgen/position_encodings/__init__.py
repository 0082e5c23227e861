from .rope import AxialRoPE2D, apply_rotary, rotate_half
from .sincos import SinCos2D, sincos_1d

__all__ = ['AxialRoPE2D', 'apply_rotary', 'rotate_half', 'SinCos2D', 'sincos_1d']
