"""Small tools that are not a building block (no registry entries)."""
from .flops import forward_flops

__all__ = ['forward_flops']
