"""Reverse-time SDE samplers (SiT, Ma et al. 2024, section 3 and eq. 7; Song et al. 2021).

For any diffusion coefficient ``w(t) >= 0`` the SDE, integrated from t = 1 (noise) down to
t = 0 (data) in flexgen's time,

    dx = [v(x, t) - w(t) s(x, t)] dt + sqrt(2 w(t)) dW,     (dt < 0)

has the same marginals as the probability-flow ODE ``dx = v dt`` (``v`` the ODE velocity,
``s`` the score). SiT writes it forward in its own time ``1 - t``. Each step draws
``sqrt(2 w(t) |dt|) z`` with ``z = noise_like(x)``.

``w(t)`` comes from ``transport.sde_diffusion(x, t, form, norm)``; SiT's forms, in SiT's
time: ``constant`` (n), ``SBDM`` (n times the ODE's noise coefficient, score-based
diffusion), ``sigma`` (n sigma_t), ``linear``, ``decreasing``, ``increasing-decreasing``.

The grid has ``num_steps`` times from ``t_max`` (the top of the sampling interval, see
``sample_eps``) to ``last_step_size`` (to ``t_min`` without a last step), i.e.
``num_steps - 1`` SDE steps, then a deterministic last step to t = 0:

- ``'Mean'``: ``x + (v - w s) (0 - t_last)`` at ``t_last = last_step_size`` (the SDE
  drift, no noise); ``'Euler'``: ``x + v (0 - t_last)`` (the ODE velocity);
- ``'Tweedie'``: ``E[x0 | x]`` = ``(x + sigma^2 s) / alpha`` (``transport.denoised``);
- ``None``: no last step (the grid ends at ``t_min``).

NFE: Euler-Maruyama ``num_steps`` (``num_steps - 1`` without a last step), Heun
``2 num_steps - 1`` (without a last step ``2 num_steps - 2``, one less when the grid
ends at t = 0).
"""
import torch

from flexgen.registry import SAMPLERS
from flexgen.transports.gaussian import GaussianTransport
from .base import Sampler, require_noise_like
from .ode import eps_interval, sampling_interval, time_grid

LAST_STEPS = (None, 'Mean', 'Tweedie', 'Euler')


# --------------------------------------------------------------------------- solvers
def euler_maruyama(drift_fn, diffusion_fn, x, times, noise_like, callback=None):
    """Euler-Maruyama: ``x + f(x, t) dt + sqrt(2 w(t) |dt|) z`` over ``times``."""
    for i, (t, t_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist())):
        dt = t_next - t
        x = x + drift_fn(x, t) * dt + (2 * diffusion_fn(x, t) * abs(dt)) ** 0.5 * noise_like(x)
        if callback is not None:
            callback(i, x)
    return x


def heun_sde(drift_fn, diffusion_fn, x, times, noise_like, callback=None):
    """SiT's stochastic Heun: add the noise first, ``x' = x + sqrt(2 w(t) |dt|) z``, then
    a Heun (trapezoid) step of the drift from ``x'``. Two evaluations per step, except
    that a step ending exactly at t = 0 keeps its Euler predictor (the score, hence the
    drift, is singular there; SiT gets NaN)."""
    for i, (t, t_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist())):
        dt = t_next - t
        x = x + (2 * diffusion_fn(x, t) * abs(dt)) ** 0.5 * noise_like(x)
        d = drift_fn(x, t)
        x = x + dt * d if t_next == 0 else x + 0.5 * dt * (d + drift_fn(x + dt * d, t_next))
        if callback is not None:
            callback(i, x)
    return x


# --------------------------------------------------------------------------- samplers
class _SDESampler(Sampler):
    """Shared arguments of the SDE samplers.

    Args:
        num_steps: grid points (``num_steps - 1`` SDE steps, then the last step).
        diffusion_form, diffusion_norm: ``w(t)`` (see the module docstring). SiT's
            ``sample_sde`` defaults to ``'SBDM'``, its command line (and flexgen) to
            ``'sigma'``, which with norm 1 is also REPA's SDE.
        last_step: ``'Mean'``, ``'Tweedie'``, ``'Euler'`` or ``None``.
        last_step_size: the time the SDE stops at before the last step (SiT: 0.04).
        shift: time shift of the grid (1 = uniform, SiT).
        sample_eps: as for the ODE samplers; ``None`` takes the transport's
            ``sample_interval``. ``w`` must be finite on the grid (SiT's SBDM is infinite
            at t = 1 on linear / GVP paths: ``Interpolant`` caps it; a transport that
            does not needs a noise-end eps).
    """

    def __init__(self, num_steps=250, diffusion_form='sigma', diffusion_norm=1.0,
                 last_step='Mean', last_step_size=0.04, shift=1.0, sample_eps=None):
        if int(num_steps) != num_steps or num_steps < 2:
            raise ValueError(f'{type(self).__name__}: num_steps must be an integer >= 2, '
                             f'got {num_steps!r}')
        if last_step not in LAST_STEPS:
            raise ValueError(f'{type(self).__name__}: last_step must be one of {LAST_STEPS}, '
                             f'got {last_step!r}')
        if last_step is not None and not 0 < last_step_size < 1:
            raise ValueError(f'{type(self).__name__}: last_step_size must be in (0, 1) with '
                             f'last_step={last_step!r} (None takes no last step), '
                             f'got {last_step_size!r}')
        if sample_eps is not None:
            eps_interval(sample_eps)
        self.num_steps, self.shift, self.sample_eps = int(num_steps), float(shift), sample_eps
        self.diffusion_form, self.diffusion_norm = diffusion_form, float(diffusion_norm)
        self.last_step, self.last_step_size = last_step, float(last_step_size)

    def times(self, transport=None):
        """The SDE's grid (before the last step), decreasing."""
        data_eps, t_max = sampling_interval(self.sample_eps, transport)
        t_min = self.last_step_size if self.last_step is not None else data_eps
        if not t_min < t_max:
            raise ValueError(f'{type(self).__name__}: the SDE would run from t={t_max:g} to '
                             f't={t_min:g}; lower last_step_size or sample_eps')
        return time_grid(self.num_steps - 1, self.shift, t_min, t_max)

    def __call__(self, model_fn, transport, noise, noise_like=None, callback=None):
        if not isinstance(transport, GaussianTransport):
            raise TypeError(f'{type(self).__name__} needs a GaussianTransport (score, '
                            f'sde_diffusion; e.g. Interpolant), got {type(transport).__name__}')
        require_noise_like(noise_like, type(self).__name__)
        times = self.times(transport)

        def diffusion_fn(x, t):
            return transport.sde_diffusion(x, t, self.diffusion_form, self.diffusion_norm)

        for t in (times[0].item(), times[-1].item()):
            w = torch.as_tensor(diffusion_fn(noise, t))
            if not (torch.isfinite(w).all() and (w >= 0).all()):
                raise ValueError(
                    f'{type(self).__name__}: diffusion_form={self.diffusion_form!r} gives '
                    f'w(t={t:g}) = {w.flatten()[0].item()}; cut the grid short of that end '
                    f'with sample_eps (data_eps, noise_eps)')

        def drift_fn(x, t):
            return transport.sde_drift(model_fn(x, t), x, t, self.diffusion_form,
                                       self.diffusion_norm)

        x = self.step(drift_fn, diffusion_fn, noise, times, noise_like, callback)
        if self.last_step is None:
            return x
        t = times[-1].item()
        out = model_fn(x, t)
        if self.last_step == 'Tweedie':
            x = transport.denoised(out, x, t)
        elif self.last_step == 'Euler':
            x = x - self.last_step_size * transport.velocity(out, x, t)
        else:  # 'Mean'
            x = x - self.last_step_size * transport.sde_drift(out, x, t, self.diffusion_form,
                                                              self.diffusion_norm)
        if callback is not None:
            callback(self.num_steps - 1, x)
        return x


@SAMPLERS.register_module()
class EulerMaruyamaSDE(_SDESampler):
    """Euler-Maruyama on the reverse SDE (SiT's ``sample_sde(sampling_method='Euler')``,
    REPA's ``euler_maruyama_sampler``): NFE = ``num_steps``."""
    step = staticmethod(euler_maruyama)


@SAMPLERS.register_module()
class HeunSDE(_SDESampler):
    """SiT's stochastic Heun on the reverse SDE: NFE = ``2 num_steps - 1``."""
    step = staticmethod(heun_sde)
