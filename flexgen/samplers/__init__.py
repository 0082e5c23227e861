from .euler import EulerODE, euler, shifted_times
from .guidance import ClassifierFreeGuidance

__all__ = ['EulerODE', 'euler', 'shifted_times', 'ClassifierFreeGuidance']
