from .base import Sampler
from .ddpm import DDIM, DDPMAncestral
from .guidance import AutoGuidance, ClassifierFreeGuidance
from .guidance_base import Guidance
from .likelihood import ode_likelihood
from .ode import AdaptiveODE, EulerODE, HeunODE, dopri5, euler, heun, time_grid
from .sde import EulerMaruyamaSDE, HeunSDE, euler_maruyama, heun_sde

__all__ = [
    'Sampler', 'Guidance', 'DDIM', 'DDPMAncestral', 'AutoGuidance', 'ClassifierFreeGuidance',
    'ode_likelihood', 'AdaptiveODE', 'EulerODE', 'HeunODE', 'dopri5', 'euler', 'heun',
    'time_grid', 'EulerMaruyamaSDE', 'HeunSDE', 'euler_maruyama', 'heun_sde']
