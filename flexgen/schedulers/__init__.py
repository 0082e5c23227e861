from .ddpm import DDPM, DiffusionSchedule, space_timesteps
from .interpolants import GaussianTransport, Interpolant
from .rectified_flow import RectifiedFlow
from .time_samplers import (DiscreteUniformTime, LogitNormalTime, ResolutionShiftedTime,
                            ShiftedTime, UniformTime, time_shift)

__all__ = ['DDPM', 'DiffusionSchedule', 'space_timesteps', 'GaussianTransport', 'Interpolant',
           'RectifiedFlow', 'DiscreteUniformTime', 'LogitNormalTime', 'ResolutionShiftedTime',
           'ShiftedTime', 'UniformTime', 'time_shift']
