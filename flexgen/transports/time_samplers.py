"""Training-time distributions of ``t`` in [0, 1] (t = 0 data, t = 1 noise); what a time
sampler is: :mod:`flexgen.transports.time_sampler_base`."""
import torch

from flexgen.registry import TIME_SAMPLERS, build

from .time_sampler_base import STREAM, TimeSampler


def time_shift(t, shift):
    """``t' = s t / (1 + (s - 1) t)`` (Esser et al. 2024, SD3 eq. 23; Flux's
    ``exp(mu) / (exp(mu) + 1 / t - 1)`` with ``s = exp(mu)``): the map between two noise
    schedules with the same signal-to-noise ratio up to a factor ``s^2``. ``s > 1`` moves
    t towards the noise (t = 1); the ends stay fixed (exactly: written ``s t / (s t + 1 - t)``)."""
    return shift * t / (shift * t + (1 - t))


@TIME_SAMPLERS.register_module()
class UniformTime(TimeSampler):
    """``t ~ U[t_min, t_max]``."""

    def __init__(self, t_min=0.0, t_max=1.0):
        self.t_min, self.t_max = t_min, t_max

    def __call__(self, draws, seqlens=None):
        return self.t_min + (self.t_max - self.t_min) * draws.uniform(STREAM)


@TIME_SAMPLERS.register_module()
class LogitNormalTime(TimeSampler):
    """``t = sigmoid(mean + std * n)``, ``n ~ N(0, 1)`` (Esser et al. 2024, SD3 eq. 19;
    FiTv2's and NiT's "lognorm")."""

    def __init__(self, mean=0.0, std=1.0):
        self.mean, self.std = mean, std

    def __call__(self, draws, seqlens=None):
        return torch.sigmoid(self.mean + self.std * draws.normal(STREAM))


@TIME_SAMPLERS.register_module()
class DiscreteUniformTime(TimeSampler):
    """A DDPM step ``k ~ U{0, ..., T-1}`` as flexgen time ``t = k / T`` (DiT's
    ``randint(0, 1000)``; pair with ``DDPM(num_timesteps=T)``)."""

    def __init__(self, num_timesteps=1000):
        if int(num_timesteps) < 1:
            raise ValueError(f'DiscreteUniformTime: num_timesteps must be >= 1, '
                             f'got {num_timesteps}')
        self.num_timesteps = int(num_timesteps)

    def __call__(self, draws, seqlens=None):
        k = torch.floor(draws.uniform(STREAM, torch.float64) * self.num_timesteps)
        return k.to(torch.float32) / self.num_timesteps


@TIME_SAMPLERS.register_module()
class ShiftedTime(TimeSampler):
    """Another sampler's draws warped by ``t' = s t / (1 + (s - 1) t)`` (SD3 eq. 23).

    Args:
        base: the sampler to warp (a config dict or a sampler), e.g. ``LogitNormalTime``.
        shift: ``s``; 1 is the identity, ``s > 1`` trains more at high noise.
    """

    def __init__(self, base=dict(type='UniformTime'), shift=1.0):
        if shift <= 0:
            raise ValueError(f'ShiftedTime: shift must be > 0, got {shift}')
        self.base, self.shift = build(TIME_SAMPLERS, base), float(shift)

    def __call__(self, draws, seqlens=None):
        return time_shift(self.base(draws, seqlens=seqlens), self.shift)


@TIME_SAMPLERS.register_module()
class ResolutionShiftedTime(TimeSampler):
    """Another sampler's draws shifted per image by a shift that grows with its token count
    ``n`` (more pixels keep more signal at equal noise, so large images train noisier).

    Rules:
        ``'sqrt'``: ``s = shift * sqrt(n / base_tokens)`` (SD3 section 5.3.2: equal
            uncertainty for ``n`` vs ``base_tokens`` tokens when ``s = sqrt(n / base)``).
        ``'exp_linear'``: ``s = exp(mu)``, ``mu`` linear in ``n`` from ``mu[0]`` at
            ``base_tokens`` to ``mu[1]`` at ``max_tokens`` (Flux / diffusers
            ``calculate_shift``: 0.5 at 256 tokens, 1.15 at 4096).

    Args:
        base: the sampler to warp (config dict or sampler).
        base_tokens: the token count that gets ``s = shift`` (``'sqrt'``) / ``exp(mu[0])``.
        rule: ``'sqrt'`` or ``'exp_linear'``.
        shift: the shift at ``base_tokens`` for ``'sqrt'``.
        max_tokens, mu: the second point of ``'exp_linear'`` and the two ``mu`` values.
    """

    def __init__(self, base=dict(type='UniformTime'), base_tokens=256, rule='sqrt', shift=1.0,
                 max_tokens=4096, mu=(0.5, 1.15)):
        if rule not in ('sqrt', 'exp_linear'):
            raise ValueError(f"ResolutionShiftedTime: rule must be 'sqrt' or 'exp_linear', "
                             f'got {rule!r}')
        if base_tokens <= 0 or shift <= 0 or (rule == 'exp_linear' and max_tokens == base_tokens):
            raise ValueError(f'ResolutionShiftedTime: need base_tokens > 0, shift > 0 and '
                             f'max_tokens != base_tokens (got {base_tokens}, {shift}, '
                             f'{max_tokens})')
        self.base = build(TIME_SAMPLERS, base)
        self.base_tokens, self.rule, self.shift = float(base_tokens), rule, float(shift)
        self.max_tokens, self.mu = float(max_tokens), tuple(float(m) for m in mu)

    def shift_for(self, seqlens):
        """The shift of each image, float64 ``[B]``."""
        n = torch.as_tensor(seqlens).to(torch.float64).reshape(-1)
        if self.rule == 'sqrt':
            return self.shift * torch.sqrt(n / self.base_tokens)
        slope = (self.mu[1] - self.mu[0]) / (self.max_tokens - self.base_tokens)
        return torch.exp(self.mu[0] + slope * (n - self.base_tokens))

    def __call__(self, draws, seqlens=None):
        if seqlens is None:
            raise ValueError('ResolutionShiftedTime needs each image\'s token count: call '
                             'sampler(draws, seqlens=batch.seqlens)')
        t = self.base(draws, seqlens=seqlens)
        shift = self.shift_for(seqlens)
        if len(shift) != len(t):
            raise ValueError(f'ResolutionShiftedTime: {len(shift)} seqlens for {len(t)} images')
        return time_shift(t.double(), shift).to(t.dtype)


__all__ = ['TimeSampler', 'time_shift', 'UniformTime', 'LogitNormalTime', 'DiscreteUniformTime',
           'ShiftedTime', 'ResolutionShiftedTime']
