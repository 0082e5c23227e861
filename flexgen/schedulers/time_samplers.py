"""Training-time distributions of ``t`` in [0, 1] (t = 0 data, t = 1 noise).

A time sampler draws one ``t`` per image: ``sampler(generators, device, seqlens=None)``
with one ``torch.Generator`` per image (or ``None`` entries / a count for the global RNG),
so an image's draw does not depend on what else is in the batch. ``seqlens`` (tokens per
image, a list or tensor ``[B]``) is needed only by resolution-dependent samplers.
"""
import torch

from flexgen.registry import TIME_SAMPLERS, build


def per_image(draw, generators, device):
    """Stack ``draw(generator)`` (a 1-element tensor) over images."""
    if isinstance(generators, int):
        generators = [None] * generators
    if not generators:
        return torch.zeros(0, device=device)
    return torch.cat([draw(g) for g in generators]).to(device)


def time_shift(t, shift):
    """``t' = s t / (1 + (s - 1) t)`` (Esser et al. 2024, SD3 eq. 23; Flux's
    ``exp(mu) / (exp(mu) + 1 / t - 1)`` with ``s = exp(mu)``): the map between two noise
    schedules with the same signal-to-noise ratio up to a factor ``s^2``. ``s > 1`` moves
    t towards the noise (t = 1); the ends stay fixed (exactly: written ``s t / (s t + 1 - t)``)."""
    return shift * t / (shift * t + (1 - t))


@TIME_SAMPLERS.register_module()
class UniformTime:
    """``t ~ U[t_min, t_max]``."""

    def __init__(self, t_min=0.0, t_max=1.0):
        self.t_min, self.t_max = t_min, t_max

    def __call__(self, generators, device='cpu', seqlens=None):
        u = per_image(lambda g: torch.rand(1, generator=g), generators, device)
        return self.t_min + (self.t_max - self.t_min) * u


@TIME_SAMPLERS.register_module()
class LogitNormalTime:
    """``t = sigmoid(mean + std * n)``, ``n ~ N(0, 1)`` (Esser et al. 2024, SD3 eq. 19;
    FiTv2's and NiT's "lognorm")."""

    def __init__(self, mean=0.0, std=1.0):
        self.mean, self.std = mean, std

    def __call__(self, generators, device='cpu', seqlens=None):
        n = per_image(lambda g: torch.randn(1, generator=g), generators, device)
        return torch.sigmoid(self.mean + self.std * n)


@TIME_SAMPLERS.register_module()
class DiscreteUniformTime:
    """A DDPM step ``k ~ U{0, ..., T-1}`` as flexgen time ``t = k / T`` (DiT's
    ``randint(0, 1000)``; pair with ``DDPM(num_timesteps=T)``)."""

    def __init__(self, num_timesteps=1000):
        if int(num_timesteps) < 1:
            raise ValueError(f'DiscreteUniformTime: num_timesteps must be >= 1, '
                             f'got {num_timesteps}')
        self.num_timesteps = int(num_timesteps)

    def __call__(self, generators, device='cpu', seqlens=None):
        k = per_image(lambda g: torch.randint(0, self.num_timesteps, (1,), generator=g),
                      generators, device)
        return k.to(torch.float32) / self.num_timesteps


@TIME_SAMPLERS.register_module()
class ShiftedTime:
    """Another sampler's draws warped by ``t' = s t / (1 + (s - 1) t)`` (SD3 eq. 23).

    Args:
        base: the sampler to warp (a config dict or a sampler), e.g. ``LogitNormalTime``.
        shift: ``s``; 1 is the identity, ``s > 1`` trains more at high noise.
    """

    def __init__(self, base=dict(type='UniformTime'), shift=1.0):
        if shift <= 0:
            raise ValueError(f'ShiftedTime: shift must be > 0, got {shift}')
        self.base, self.shift = build(TIME_SAMPLERS, base), float(shift)

    def __call__(self, generators, device='cpu', seqlens=None):
        return time_shift(self.base(generators, device, seqlens=seqlens), self.shift)


@TIME_SAMPLERS.register_module()
class ResolutionShiftedTime:
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
        n = torch.as_tensor(seqlens, dtype=torch.float64).reshape(-1)
        if self.rule == 'sqrt':
            return self.shift * torch.sqrt(n / self.base_tokens)
        slope = (self.mu[1] - self.mu[0]) / (self.max_tokens - self.base_tokens)
        return torch.exp(self.mu[0] + slope * (n - self.base_tokens))

    def __call__(self, generators, device='cpu', seqlens=None):
        if seqlens is None:
            raise ValueError('ResolutionShiftedTime needs each image\'s token count: call '
                             'sampler(generators, device, seqlens=batch.seqlens_list)')
        t = self.base(generators, device, seqlens=seqlens)
        shift = self.shift_for(seqlens)
        if len(shift) != len(t):
            raise ValueError(f'ResolutionShiftedTime: {len(shift)} seqlens for {len(t)} images')
        return time_shift(t.double(), shift.to(t.device)).to(t.dtype)


__all__ = ['per_image', 'time_shift', 'UniformTime', 'LogitNormalTime', 'DiscreteUniformTime',
           'ShiftedTime', 'ResolutionShiftedTime']
