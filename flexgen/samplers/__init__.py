from .ddpm import DDIM, DDPMAncestral
from .guidance import AutoGuidance, ClassifierFreeGuidance
from .likelihood import ode_likelihood
from .ode import AdaptiveODE, EulerODE, HeunODE, dopri5, euler, heun, time_grid
from .sde import EulerMaruyamaSDE, HeunSDE, euler_maruyama, heun_sde

__all__ = ['DDIM', 'DDPMAncestral', 'AutoGuidance', 'ClassifierFreeGuidance', 'ode_likelihood',
           'AdaptiveODE', 'EulerODE', 'HeunODE', 'dopri5', 'euler', 'heun', 'time_grid',
           'EulerMaruyamaSDE', 'HeunSDE', 'euler_maruyama', 'heun_sde']
