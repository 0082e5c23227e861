"""Training-time distributions of ``t`` in [0, 1] (t = 0 data, t = 1 noise).

A time sampler draws one ``t`` per image: ``sampler(generators, device)`` with one
``torch.Generator`` per image (or ``None`` entries / a count for the global RNG), so an
image's draw does not depend on what else is in the batch.
"""
import torch

from flexgen.registry import TIME_SAMPLERS


def per_image(draw, generators, device):
    """Stack ``draw(generator)`` (a 1-element tensor) over images."""
    if isinstance(generators, int):
        generators = [None] * generators
    if not generators:
        return torch.zeros(0, device=device)
    return torch.cat([draw(g) for g in generators]).to(device)


@TIME_SAMPLERS.register_module()
class UniformTime:
    """``t ~ U[t_min, t_max]``."""

    def __init__(self, t_min=0.0, t_max=1.0):
        self.t_min, self.t_max = t_min, t_max

    def __call__(self, generators, device='cpu'):
        u = per_image(lambda g: torch.rand(1, generator=g), generators, device)
        return self.t_min + (self.t_max - self.t_min) * u


@TIME_SAMPLERS.register_module()
class LogitNormalTime:
    """``t = sigmoid(mean + std * n)``, ``n ~ N(0, 1)`` (Esser et al. 2024, SD3 eq. 19;
    FiTv2's and NiT's "lognorm")."""

    def __init__(self, mean=0.0, std=1.0):
        self.mean, self.std = mean, std

    def __call__(self, generators, device='cpu'):
        n = per_image(lambda g: torch.randn(1, generator=g), generators, device)
        return torch.sigmoid(self.mean + self.std * n)
