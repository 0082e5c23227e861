from .flex_dit import FlexDiT

__all__ = ['FlexDiT']
