from .rectified_flow import RectifiedFlow
from .time_samplers import LogitNormalTime, UniformTime

__all__ = ['RectifiedFlow', 'LogitNormalTime', 'UniformTime']
