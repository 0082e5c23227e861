"""Samplers that walk a DDPM transport's discrete steps (respaced), from the noisiest kept
step down to step 0:

- ancestral sampling (Ho et al. 2020 Alg. 2; ADM ``p_sample_loop``, DiT's sampler):
  ``x_{prev} = mu_theta(x_k) + sqrt(Sigma_theta) z`` (no noise at the last step);
- DDIM (Song et al. 2021 eq. 12; ADM ``ddim_sample``):
  ``x_{prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - s^2) eps_hat + s z``,
  ``s = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)``.

``num_steps`` is a respacing spec for ``space_timesteps``: an int N means ``'N'`` (N steps
evenly strided over 0..T-1 with rounding, both ends kept, as DiT's ``sample.py``); a string
passes through (``'ddim50'`` for ADM's integer-stride DDIM steps, ``'10,15,20'`` sections).
``model_fn`` is called at flexgen time ``t = k / T`` with ``k`` the original step.
"""
import torch

from flexgen.registry import SAMPLERS
from flexgen.transports.ddpm import DDPM

from .base import Sampler, require_noise_like


def respaced_schedule(transport, num_steps, sampler_name):
    if not isinstance(transport, DDPM):
        raise TypeError(f'{sampler_name} walks the discrete steps of a DDPM transport; got '
                        f'{type(transport).__name__} (use an ODE / SDE sampler for it)')
    spec = str(num_steps) if isinstance(num_steps, int) else num_steps
    return transport.respace(spec)


@SAMPLERS.register_module()
class DDPMAncestral(Sampler):
    """Ancestral sampling with the transport's variance (fixed or learned).

    Args:
        num_steps: respacing spec (DiT samples with 250).
        clip_denoised: clamp x0_hat to [-1, 1] (pixel-space models; DiT: False).
    """

    def __init__(self, num_steps='250', clip_denoised=False):
        self.num_steps, self.clip_denoised = num_steps, clip_denoised

    def __call__(self, model_fn, transport, x, noise_like=None, callback=None):
        schedule = respaced_schedule(transport, self.num_steps, 'DDPMAncestral')
        if len(schedule) > 1:
            require_noise_like(noise_like, 'DDPMAncestral')
        for step, i in enumerate(reversed(range(len(schedule)))):
            output = model_fn(x, schedule.time(i))
            mean, log_var, _ = transport.p_mean_variance(output, x, i, schedule,
                                                         self.clip_denoised)
            x = mean if i == 0 else mean + torch.exp(0.5 * log_var).to(x.dtype) * noise_like(x)
            if callback is not None:
                callback(step, x)
        return x


@SAMPLERS.register_module()
class DDIM(Sampler):
    """DDIM; ``eta = 0`` is deterministic (the probability-flow ODE discretised in
    ``(sigma / alpha, x / alpha)``), ``eta = 1`` matches ancestral sampling's variance.

    Args:
        num_steps: respacing spec (an int N -> ``'N'``; ``'ddimN'`` for ADM's steps).
        eta: the noise scale.
        clip_denoised: clamp x0_hat to [-1, 1].
    """

    def __init__(self, num_steps=50, eta=0.0, clip_denoised=False):
        if eta < 0:
            raise ValueError(f'DDIM: eta must be >= 0, got {eta}')
        self.num_steps, self.eta, self.clip_denoised = num_steps, float(eta), clip_denoised

    def __call__(self, model_fn, transport, x, noise_like=None, callback=None):
        schedule = respaced_schedule(transport, self.num_steps, 'DDIM')
        if self.eta > 0 and len(schedule) > 1:
            require_noise_like(noise_like, 'DDIM')
        for step, i in enumerate(reversed(range(len(schedule)))):
            output = model_fn(x, schedule.time(i))
            x0, _ = transport.x0_eps_at(output, x, i, schedule)
            if self.clip_denoised:
                x0 = x0.clamp(-1, 1)
            abar = float(schedule.alphas_cumprod[i])
            abar_prev = float(schedule.alphas_cumprod_prev[i])
            eps = (x - abar ** 0.5 * x0) / (1 - abar) ** 0.5  # re-derived after clipping
            sigma = self.eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
            x = abar_prev ** 0.5 * x0 + max(1 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps
            if sigma > 0 and i > 0:
                x = x + sigma * noise_like(x)
            if callback is not None:
                callback(step, x)
        return x
