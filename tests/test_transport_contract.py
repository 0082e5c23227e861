"""Transports written only from their contracts (flexgen.transports.base, .gaussian) train
in a generator and sample with the samplers that need what they provide; samplers that
need more refuse them by name."""
import math

import pytest
import torch

import flexgen
from flexgen.registry import MODELS, TRANSPORTS
from flexgen.samplers import DDIM, EulerMaruyamaSDE, EulerODE, HeunSDE
from flexgen.transports import Interpolant, RectifiedFlow, Transport
from flexgen.transports.gaussian import GaussianTransport

flexgen.register_all_modules()
MU, S = 1.5, 0.5


@TRANSPORTS.register_module(force=True)
class _ContractStraightFlow(Transport):
    """The linear path with velocity prediction, from the Transport contract alone."""

    def interpolate(self, x0, noise, t):
        return (1 - t) * x0 + t * noise

    def training_target(self, x0, noise, t):
        return noise - x0

    def loss(self, output, x0, noise, t):
        return (output[..., :x0.shape[-1]] - self.training_target(x0, noise, t)).pow(2).mean(-1)

    def velocity(self, output, x, t):
        return output[..., :x.shape[-1]]


class _ContractCosinePath(GaussianTransport):
    """a = cos(pi t / 2), b = sin(pi t / 2) with velocity prediction, from the
    GaussianTransport contract (coefficients, their derivatives, x0 / eps from the output)."""

    def alpha_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)

    def d_alpha_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t), 0.5 * math.pi * torch.cos(
            0.5 * math.pi * t)

    def x0_eps(self, output, x, t):
        a, b = (c.to(x.dtype) for c in self.alpha_sigma(t))
        da, db = (c.to(x.dtype) for c in self.d_alpha_sigma(t))
        v, det = output[..., :x.shape[-1]], a * db - da * b
        return (db * x - b * v) / det, (a * v - da * x) / det

    def training_target(self, x0, noise, t):
        da, db = (c.to(x0.dtype) for c in self.d_alpha_sigma(t))
        return da * x0 + db * noise

    def loss(self, output, x0, noise, t):
        return (output[..., :x0.shape[-1]] - self.training_target(x0, noise, t)).pow(2).mean(-1)


def gaussian_data_velocity(transport):
    """The exact velocity of a Gaussian transport on N(MU, S^2) data."""
    def fn(x, t):
        a, b = (float(c) for c in transport.alpha_sigma(t))
        da, db = (float(c) for c in transport.d_alpha_sigma(t))
        var = a * a * S * S + b * b
        return da * (MU + a * S * S / var * (x - a * MU)) + db * b / var * (x - a * MU)
    return fn


def test_a_transport_from_the_contract_trains_and_samples():
    backbone = dict(type='FlexDiT', in_channels=3, patch_size=2, hidden_size=32, depth=1,
                    num_heads=2, num_classes=4, pos_embed=None, rope=dict(type='AxialRoPE2D'))
    model = MODELS.build(dict(type='DiffusionGenerator', backbone=backbone,
                              transport=dict(type='_ContractStraightFlow'),
                              sampler=dict(type='EulerODE', num_steps=3),
                              direction_loss=dict(type='DirectionLoss')))
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 8, 6, generator=g), torch.randn(3, 4, 4, generator=g)]
    losses = model.loss(images, dict(label=torch.tensor([0, 3]), index=torch.tensor([0, 1]),
                                     seed=0, step=0))
    assert set(losses) == {'loss', 'loss_direction'}
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        out = model.generate([1, 2], [(8, 8), (4, 12)], [0, 1])
    assert [tuple(x.shape) for x in out] == [(3, 8, 8), (3, 4, 12)]
    # its ODE sampling is rectified flow's
    z = torch.randn(500, 1, generator=g, dtype=torch.float64)
    straight = EulerODE(num_steps=8)(gaussian_data_velocity(RectifiedFlow()),
                                     _ContractStraightFlow(), z.clone())
    assert torch.equal(straight, EulerODE(num_steps=8)(
        gaussian_data_velocity(RectifiedFlow()), RectifiedFlow(), z.clone()))
    # samplers that need a Gaussian or a DDPM transport say so
    with pytest.raises(TypeError, match='HeunSDE needs a GaussianTransport.*_ContractStraight'):
        HeunSDE(num_steps=4)(lambda x, t: x, _ContractStraightFlow(), z, noise_like=torch.randn_like)
    with pytest.raises(TypeError, match='DDIM walks the discrete steps of a DDPM transport'):
        DDIM(num_steps=4)(lambda x, t: x, _ContractStraightFlow(), z)


def test_a_gaussian_transport_from_the_contract_samples_the_sde():
    """Written from alpha_sigma / d_alpha_sigma / x0_eps alone, the cosine path gets
    score, denoised and the reverse SDE from the base class: Euler-Maruyama with its exact
    velocity reproduces the data, and equals SiT's GVP interpolant step for step."""
    mine, gvp = _ContractCosinePath(), Interpolant(path='gvp', prediction='velocity')
    x = torch.linspace(-2, 2, 7, dtype=torch.float64)[:, None]
    for t in (0.2, 0.5, 0.9):
        out = gaussian_data_velocity(gvp)(x, t)
        for name in ('velocity', 'score', 'denoised'):
            torch.testing.assert_close(getattr(mine, name)(out, x, t), getattr(gvp, name)(out, x, t))
    n = 20_000
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def noise_like(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)

    sampler = EulerMaruyamaSDE(num_steps=100, sample_eps=(0.0, 0.01))
    out = sampler(gaussian_data_velocity(mine), mine, z.clone(), noise_like=noise_like(4))
    ref = sampler(gaussian_data_velocity(gvp), gvp, z.clone(), noise_like=noise_like(4))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(out.var().item() - S * S) < 5 * S * S * math.sqrt(2 / n)
