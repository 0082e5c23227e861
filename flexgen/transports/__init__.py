"""Transports (how training pairs are made and network outputs read) and time samplers
(the training distribution of t)."""
from .base import Transport
from .ddpm import DDPM, DiffusionSchedule, space_timesteps
from .gaussian import GaussianTransport
from .interpolants import Interpolant
from .rectified_flow import RectifiedFlow
from .time_sampler_base import TimeSampler
from .time_samplers import (DiscreteUniformTime, LogitNormalTime, ResolutionShiftedTime,
                            ShiftedTime, UniformTime, time_shift)

__all__ = ['Transport', 'GaussianTransport', 'DDPM', 'DiffusionSchedule', 'space_timesteps',
           'Interpolant', 'RectifiedFlow', 'TimeSampler', 'DiscreteUniformTime', 'LogitNormalTime',
           'ResolutionShiftedTime', 'ShiftedTime', 'UniformTime', 'time_shift']
