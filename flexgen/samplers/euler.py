"""Kept for imports written before the ODE samplers moved to :mod:`flexgen.samplers.ode`."""
from .ode import EulerODE, euler, shifted_times

__all__ = ['EulerODE', 'euler', 'shifted_times']
