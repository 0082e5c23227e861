"""Reverse-SDE samplers against closed forms on Gaussian data N(MU, S^2) (the test-local
transport of test_ode_samplers, whose "network" output is the exact velocity)."""
import math

import pytest
import torch

from flexgen.samplers.sde import EulerMaruyamaSDE, HeunSDE
from flexgen.transports import DDPM, interpolants
from flexgen.transports.gaussian import DIFFUSION_FORMS
from test_ode_samplers import MU, S, GaussianLinear, exact_output

FORMS = ('constant', 'SBDM', 'sigma', 'linear', 'decreasing', 'increasing-decreasing')
LAST_STEPS = (None, 'Mean', 'Tweedie', 'Euler')
SAMPLERS = (EulerMaruyamaSDE, HeunSDE)


def model_fn(x, t, calls=None):
    if calls is not None:
        calls.append(t)
    return GaussianLinear.exact_velocity(x, t)


def per_image_noise_like(seeds, seqlens):
    """Like DiffusionGenerator's: each image's rows drawn from that image's generator."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def noise_like(x):
        return torch.cat([torch.randn(part.shape, generator=g, dtype=x.dtype)
                          for part, g in zip(x.split(seqlens), generators)])
    return noise_like


def start(n, seed=0):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(sampler, x, seed=5, transport=None):
    return sampler(model_fn, transport or GaussianLinear(), x.clone(),
                   noise_like=per_image_noise_like([seed], [len(x)]))


@pytest.mark.parametrize('cls', SAMPLERS)
@pytest.mark.parametrize('last_step', ['Mean', 'Tweedie', 'Euler'])
def test_sde_reproduces_the_data_mean_and_variance(cls, last_step):
    n = 20_000
    out = run(cls(num_steps=100, last_step=last_step), start(n))
    # five standard errors of the sample mean and of the sample variance
    assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(out.var().item() - S * S) < 5 * S * S * math.sqrt(2 / n)


@pytest.mark.parametrize('cls', SAMPLERS)
def test_every_diffusion_form_and_last_step_stays_finite(cls):
    n = 1000
    x = start(n)
    for form in FORMS:
        # the test transport's SBDM is infinite at t = 1: start below it
        eps = dict(sample_eps=(0.0, 0.05)) if form == 'SBDM' else {}
        for last_step in LAST_STEPS:
            out = run(cls(num_steps=40, diffusion_form=form, last_step=last_step, **eps), x)
            assert torch.isfinite(out).all(), (form, last_step)
            assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n), (form, last_step)
            # 'Mean' leaves out the last step's noise, variance 2 w(h) h (h = 0.04)
            missing = (2 * GaussianLinear().sde_diffusion(x, 0.04, form) * 0.04
                       if last_step == 'Mean' else 0.0)
            assert abs(out.var().item() - (S * S - missing)) < 0.05, (form, last_step)


def test_infinite_diffusion_is_a_clear_error():
    with pytest.raises(ValueError, match="'SBDM'.*sample_eps"):
        run(EulerMaruyamaSDE(num_steps=10, diffusion_form='SBDM'), start(4))


@pytest.mark.parametrize('last_step', ['Mean', 'Tweedie', 'Euler'])
def test_last_step_formulas(last_step):
    """SiT's last steps from t_last = last_step_size to 0 with h = t_last."""
    sampler, transport, seen = EulerMaruyamaSDE(num_steps=6, last_step=last_step,
                                                last_step_size=0.05), GaussianLinear(), {}
    out = sampler(model_fn, transport, start(50), noise_like=per_image_noise_like([1], [50]),
                  callback=lambda i, x: seen.setdefault(i, x))
    x, h = seen[4], 0.05
    v = GaussianLinear.exact_velocity(x, h)
    w, score = transport.sde_diffusion(x, h), transport.score(v, x, h)
    expected = {'Mean': x - h * (v - w * score), 'Euler': x - h * v,
                'Tweedie': x - h * v}[last_step]  # Tweedie: E[x0 | x] = x - t v on this path
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    assert sorted(seen) == list(range(6))


@pytest.mark.parametrize('cls', SAMPLERS)
def test_grid_and_nfe(cls):
    nfe = {}
    for last_step, sample_eps in (('Mean', None), (None, None), (None, 0.01)):
        sampler, calls = cls(num_steps=6, last_step=last_step, sample_eps=sample_eps), []
        sampler(lambda x, t: model_fn(x, t, calls), GaussianLinear(), start(4),
                noise_like=per_image_noise_like([0], [4]))
        grid = sampler.times().tolist()
        assert len(grid) == 6 and grid[0] == (0.99 if sample_eps else 1.0)
        assert grid[-1] == (0.04 if last_step else (0.01 if sample_eps else 0.0))
        expected = grid[:-1] if cls is EulerMaruyamaSDE else grid[:-1] + grid[1:]
        if last_step:
            expected = expected + [grid[-1]]
        if cls is HeunSDE and grid[-1] == 0:
            expected.remove(0.0)  # the step that ends at t = 0 keeps its Euler predictor
        assert sorted(calls) == sorted(expected), (last_step, sample_eps)
        nfe[last_step, sample_eps] = len(calls)
    # num_steps = 6: Euler-Maruyama 6 (5 without a last step), Heun 2 * 6 - 1 (without a
    # last step 2 * 6 - 2, one less when the grid ends at t = 0)
    assert nfe == ({('Mean', None): 6, (None, None): 5, (None, 0.01): 5}
                   if cls is EulerMaruyamaSDE else
                   {('Mean', None): 11, (None, None): 9, (None, 0.01): 10})


@pytest.mark.parametrize('cls', SAMPLERS)
def test_noise_comes_from_each_images_generator(cls):
    """Images A (3 rows) and B (2 rows): B's sample is the same alone or beside A, and
    the same seeds give the same samples."""
    sampler = cls(num_steps=10)
    x = start(5)
    both = sampler(model_fn, GaussianLinear(), x.clone(), per_image_noise_like([7, 8], [3, 2]))
    again = sampler(model_fn, GaussianLinear(), x.clone(), per_image_noise_like([7, 8], [3, 2]))
    alone = sampler(model_fn, GaussianLinear(), x[3:].clone(), per_image_noise_like([8], [2]))
    other = sampler(model_fn, GaussianLinear(), x.clone(), per_image_noise_like([7, 9], [3, 2]))
    assert torch.equal(both, again) and torch.equal(both[3:], alone)
    assert torch.equal(both[:3], other[:3]) and not torch.equal(both[3:], other[3:])
    # the noise is an argument: no sampler-side fallback
    with pytest.raises(ValueError, match='pass noise_like'):
        sampler(model_fn, GaussianLinear(), x.clone())


def test_bad_arguments_and_transports():
    with pytest.raises(ValueError, match='last_step'):
        EulerMaruyamaSDE(last_step='mean')
    with pytest.raises(ValueError, match='last_step_size'):
        HeunSDE(last_step='Tweedie', last_step_size=0.0)
    with pytest.raises(ValueError, match='num_steps'):
        EulerMaruyamaSDE(num_steps=1)
    with pytest.raises(ValueError, match='lower last_step_size'):
        EulerMaruyamaSDE(num_steps=5, last_step_size=0.995, sample_eps=0.01).times()
    class VelocityOnly:
        def velocity(self, out, x, t):
            return out

    with pytest.raises(TypeError, match='score'):
        EulerMaruyamaSDE(num_steps=5)(model_fn, VelocityOnly(), start(4))


# --------------------------------------------------------------- the real transports
@pytest.mark.parametrize('path', ['linear', 'gvp', 'vp'])
def test_interpolant_every_diffusion_form(path):
    n = 4000
    x = start(n)
    for prediction in ('velocity', 'noise'):
        transport = interpolants.Interpolant(path, prediction)
        for form in DIFFUSION_FORMS:
            for cls in SAMPLERS:
                out = cls(num_steps=100, diffusion_form=form, last_step='Euler')(
                    exact_output(transport), transport, x.clone(),
                    noise_like=per_image_noise_like([5], [n]))
                assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n), (form, cls)
                assert abs(out.var().item() - S * S) < 5 * S * S * math.sqrt(2 / n), (form, cls)


@pytest.mark.parametrize('transport', [interpolants.Interpolant('gvp', 'velocity'),
                                       interpolants.Interpolant('vp', 'noise'),
                                       interpolants.Interpolant('linear', 'score'),
                                       DDPM(num_timesteps=100)], ids=repr)
def test_one_output_conversion_per_evaluation(transport, monkeypatch):
    """The SDE drift reads the network output through ``x0_eps`` once per evaluation, and
    ``velocity_score`` is exactly ``(velocity, score)``."""
    x, out = start(6), start(6, seed=1)
    velocity, score = transport.velocity_score(out, x, 0.3)
    assert torch.equal(velocity, transport.velocity(out, x, 0.3))
    assert torch.equal(score, transport.score(out, x, 0.3))
    conversions, model_calls = [], []
    convert = transport.x0_eps
    monkeypatch.setattr(transport, 'x0_eps', lambda *args: conversions.append(1) or
                        convert(*args))
    EulerMaruyamaSDE(num_steps=6, last_step='Mean', sample_eps=(0.01, 0.02))(
        lambda x, t: model_fn(x, t, model_calls), transport, x,
        noise_like=per_image_noise_like([0], [6]))
    assert len(model_calls) == 6 and len(conversions) == 6
