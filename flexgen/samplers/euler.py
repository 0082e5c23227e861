"""Euler's method for the probability-flow ODE ``dx/dt = v(x, t)``, from t = 1 (noise)
to t = 0 (data): ``x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k)``."""
import torch

from flexgen.registry import SAMPLERS


def shifted_times(num_steps, shift=1.0):
    """``num_steps + 1`` times from 1 to 0, warped by ``t' = s t / (1 + (s - 1) t)``
    (Esser et al. 2024, SD3 eq. 23): ``shift > 1`` spends more steps near the noise."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def euler(velocity_fn, x, times, callback=None):
    """Integrate ``dx/dt = velocity_fn(x, t)`` over ``times`` (a decreasing grid)."""
    for i, (t, t_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist())):
        x = x + (t_next - t) * velocity_fn(x, t)
        if callback is not None:
            callback(i, x)
    return x


@SAMPLERS.register_module()
class EulerODE:
    """Euler ODE sampler with ``num_steps`` network evaluations (per guidance branch)."""

    def __init__(self, num_steps=50, shift=1.0):
        self.num_steps, self.shift = num_steps, shift

    def __call__(self, model_fn, transport, noise, noise_like=None, callback=None):
        def velocity_fn(x, t):
            return transport.velocity(model_fn(x, t), x, t)

        return euler(velocity_fn, noise, shifted_times(self.num_steps, self.shift), callback)
