"""ODE samplers and the ODE likelihood against closed forms on Gaussian data.

Data x0 ~ N(MU, S^2) per dimension on the linear path x_t = (1 - t) x0 + t eps: x_t is
N(a MU, var_t) with a = 1 - t, var_t = a^2 S^2 + t^2, and the probability-flow ODE maps
x_t to x_t' = a' MU + sqrt(var_t' / var_t) (x_t - a MU); from t = 1, x(0) = MU + S x(1).
"""
import math

import pytest
import torch

from flexgen.samplers.likelihood import ode_likelihood
from flexgen.samplers.ode import (AdaptiveODE, EulerODE, HeunODE, dopri5, eps_interval,
                                  time_grid)
from flexgen.transports import interpolants
from flexgen.transports.base import Transport
from flexgen.transports.gaussian import GaussianTransport
from flexgen.transports.time_samplers import time_shift

MU, S = 1.5, 0.5


class GaussianLinear(GaussianTransport):
    """Test-local transport: the linear path on N(MU, S^2) data whose "network" output is
    the exact velocity; score, denoised and the SDE diffusion in closed form (what the
    samplers use of a GaussianTransport: the SDE's drift takes ``velocity_score``)."""

    prediction = 'velocity'

    def __init__(self, sample_interval=(0.0, 1.0)):
        self.sample_interval = sample_interval

    @staticmethod
    def var(t):
        return (1 - t) ** 2 * S * S + t * t

    @classmethod
    def exact_velocity(cls, x, t):
        a, var = 1 - t, cls.var(t)
        return t / var * (x - a * MU) - (MU + a * S * S / var * (x - a * MU))

    @classmethod
    def flow(cls, x, t, t_next):
        """The exact probability-flow map from time t to t_next."""
        return (1 - t_next) * MU + math.sqrt(cls.var(t_next) / cls.var(t)) * (x - (1 - t) * MU)

    def velocity(self, out, x, t):
        return out[..., :x.shape[-1]]

    def denoised(self, out, x, t):
        return x - t * self.velocity(out, x, t)

    def score(self, out, x, t):
        return -(x + (1 - t) * self.velocity(out, x, t)) / t

    def velocity_score(self, out, x, t):
        return self.velocity(out, x, t), self.score(out, x, t)

    def sde_diffusion(self, x, t, form='sigma', norm=1.0):
        """SiT's forms in flexgen time (SiT's time is 1 - t); SBDM is lambda = t / (1 - t)."""
        return {'constant': norm, 'SBDM': norm * t / (1 - t) if t < 1 else math.inf,
                'sigma': norm * t, 'linear': norm * t,
                'decreasing': 0.25 * (1 - norm * math.cos(math.pi * t)) ** 2,
                'increasing-decreasing': norm * math.sin(math.pi * t) ** 2}[form]


def exact_output(transport):
    """The exact network output (velocity, noise or score) of an Interpolant on N(MU, S^2)."""
    def fn(x, t):
        a, b = (float(c) for c in transport.alpha_sigma(t))
        var = a * a * S * S + b * b
        x0, eps = MU + a * S * S / var * (x - a * MU), b / var * (x - a * MU)
        if transport.prediction == 'velocity':
            da, db = (float(c) for c in transport.d_alpha_sigma(t))
            return da * x0 + db * eps
        return eps if transport.prediction == 'noise' else -(x - a * MU) / var
    return fn


def counting_model(calls):
    def model_fn(x, t):
        calls.append(t)
        return GaussianLinear.exact_velocity(x, t)
    return model_fn


def latents(n=2000, seed=1):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------- time grids
def test_time_grid_ends_shift_and_eps():
    t = time_grid(4, shift=3.0, t_min=0.1, t_max=0.9)
    assert t[0].item() == 0.9 and t[-1].item() == 0.1 and len(t) == 5
    u = 3 * 0.5 / (1 + 2 * 0.5)
    assert abs(t[2].item() - (0.1 + 0.8 * u)) < 1e-15
    # LightningDiT's shift s on SiT's time (t = 0 noise) is flexgen's shift 1 / s
    s, sit_t = 0.3, 1 - torch.linspace(1, 0, 11, dtype=torch.float64)
    lightning = 1 - s * sit_t / (1 + (s - 1) * sit_t)
    assert torch.allclose(time_grid(10, 1 / s), lightning, atol=1e-14)
    # one time shift for training and sampling: the grid is time_shift of the uniform grid,
    # shift 1 leaves it bitwise unchanged and the ends stay exact for every shift
    u = torch.linspace(1.0, 0.0, 51, dtype=torch.float64)
    assert torch.equal(time_grid(50), u) and torch.equal(time_shift(u, 1.0), u)
    for shift in (1 / 3, 0.3, 3.0, 7.3):
        grid = time_grid(50, shift)
        assert torch.equal(grid, time_shift(u, shift))
        assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert eps_interval(0.01) == (0.01, 0.99) and eps_interval((0.001, 0.0)) == (0.001, 1.0)
    with pytest.raises(ValueError, match='sample_eps'):
        eps_interval(0.7)
    with pytest.raises(ValueError, match='num_steps'):
        EulerODE(num_steps=0)


def test_samplers_use_the_transport_interval_unless_given():
    transport = GaussianLinear(sample_interval=(0.001, 1.0))
    assert HeunODE(num_steps=5).times(transport)[-1].item() == 0.001
    assert HeunODE(num_steps=5, sample_eps=0.01).times(transport).tolist()[::5] == [0.99, 0.01]
    assert EulerODE(num_steps=5).times(Transport())[-1].item() == 0.0  # the base's [0, 1]


# ------------------------------------------------------------------------- fixed step
def test_euler_first_order_and_heun_second_order():
    z = latents()
    exact = MU + S * z
    model = counting_model([])
    for cls, low, high in ((EulerODE, 1.7, 2.3), (HeunODE, 3.4, 4.8)):
        errors = [(cls(num_steps=n)(model, GaussianLinear(), z.clone()) - exact).abs().max()
                  .item() for n in (8, 16, 32, 64)]
        ratios = [a / b for a, b in zip(errors, errors[1:])]
        assert all(low < r < high for r in ratios), (cls.__name__, errors, ratios)


def test_nfe_and_evaluation_times():
    z, grid = latents(10), time_grid(8).tolist()
    eps_grid = time_grid(8, t_min=0.01, t_max=0.99).tolist()
    for sampler, times in ((EulerODE(num_steps=8), grid[:-1]),
                           (HeunODE(num_steps=8), grid[:-1] + grid[1:-1]),  # t = 0 never
                           (HeunODE(num_steps=8, final_euler=False), grid[:-1] + grid[1:]),
                           (HeunODE(num_steps=8, sample_eps=0.01), eps_grid[:-1] + eps_grid[1:])):
        calls = []
        sampler(counting_model(calls), GaussianLinear(), z.clone())
        assert sorted(calls) == sorted(times), type(sampler).__name__


def test_sample_eps_stops_at_eps_on_the_exact_path():
    z = latents(100)
    out = AdaptiveODE(atol=1e-10, rtol=1e-10, sample_eps=(0.1, 0.0))(
        counting_model([]), GaussianLinear(), z.clone())
    assert torch.allclose(out, GaussianLinear.flow(z, 1.0, 0.1), atol=1e-7)


# ------------------------------------------------------------------------- adaptive
@pytest.mark.parametrize('rtol', [1e-6, 1e-7])
def test_dopri5_reaches_its_tolerance(rtol):
    """Every accepted step's true local error (against the exact flow from the step's
    start) is within torchdiffeq's tolerance, RMS(err / (atol + rtol max|x|)) <= 1, and so
    is the global error up to a factor 2. (At loose tolerances, 1e-3 to 1e-5 here, the
    embedded error estimate is optimistic on this problem, for torchdiffeq too.)"""
    z, atol = latents(500), rtol * 1e-3
    states, calls = [z], []
    x, info = dopri5(lambda x, t: counting_model(calls)(x, t), z.clone(), 1.0, 0.0, atol,
                     rtol, callback=lambda i, x: states.append(x), return_info=True)
    times = [1.0] + info['times']
    assert times[-1] == 0.0 and len(states) == info['accepted'] + 1
    assert info['nfe'] == len(calls) == 2 + 6 * (info['accepted'] + info['rejected'])
    for (t, t_next), (x0, x1) in zip(zip(times, times[1:]), zip(states, states[1:])):
        tol = atol + rtol * torch.max(x0.abs(), x1.abs())
        local = (x1 - GaussianLinear.flow(x0, t, t_next)) / tol
        assert local.pow(2).mean().sqrt() <= 1.0, (t, t_next)
    exact = MU + S * z
    assert ((x - exact) / (atol + rtol * exact.abs())).pow(2).mean().sqrt() <= 2.0


def test_adaptive_error_falls_with_tolerance_and_lands_on_its_grid():
    z = latents(500)
    exact = MU + S * z
    errors, nfes = [], []
    for rtol in (1e-3, 1e-5, 1e-7):
        sampler = AdaptiveODE(atol=rtol * 1e-3, rtol=rtol)
        errors.append((sampler(counting_model([]), GaussianLinear(), z.clone()) - exact)
                      .abs().max().item())
        nfes.append(sampler.last_info['nfe'])
    assert errors[0] > 30 * errors[1] > 900 * errors[2] and errors[2] < 1e-6, errors
    assert nfes[0] < nfes[1] < nfes[2]
    # with num_steps it also lands on every grid time and calls back there
    seen = []
    sampler = AdaptiveODE(atol=1e-9, rtol=1e-9, num_steps=5, shift=2.0)
    out = sampler(counting_model([]), GaussianLinear(), z.clone(),
                  callback=lambda i, x: seen.append((i, x)))
    grid = time_grid(5, 2.0).tolist()
    assert [i for i, _ in seen] == list(range(5)) and sampler.last_info['accepted'] >= 5
    for (i, x), t in zip(seen, grid[1:]):
        assert torch.allclose(x, GaussianLinear.flow(z, 1.0, t), atol=1e-7)
    assert torch.equal(out, seen[-1][1])


def test_dopri5_matches_torchdiffeq():
    """The same steps as torchdiffeq's dopri5 once torchdiffeq is told to land on the output
    times (``step_t``): by default it steps past them and interpolates, flexgen lands."""
    import torchdiffeq
    z, count = latents(500), [0]

    def f(t, x):
        count[0] += 1
        return GaussianLinear.exact_velocity(x, t.item())

    for rtol, stops in ((1e-3, ()), (1e-5, ()), (1e-7, ()), (1e-5, (0.7, 0.3, 0.05))):
        count[0], seen = 0, []
        times = torch.tensor([1.0, *stops, 0.0], dtype=torch.float64)
        ref = torchdiffeq.odeint(f, z, times, method='dopri5', atol=rtol * 1e-3, rtol=rtol,
                                 options=dict(step_t=times[1:]))
        out, info = dopri5(GaussianLinear.exact_velocity, z, 1.0, 0.0, rtol * 1e-3, rtol,
                           stops=stops, return_info=True,
                           callback=lambda i, x: seen.append(x))
        assert info['nfe'] == count[0], (rtol, stops)
        assert (out - ref[-1]).abs().max() < 1e-12, (rtol, stops)
        if stops:  # the callback ran at each stop and at t = 0
            assert len(seen) == len(ref) - 1
            for x, x_ref in zip(seen, ref[1:]):
                assert (x - x_ref).abs().max() < 1e-12, (rtol, stops)


def test_adaptive_bad_arguments():
    with pytest.raises(ValueError, match='atol'):
        AdaptiveODE(atol=0, rtol=0)
    with pytest.raises(RuntimeError, match='max_steps'):
        AdaptiveODE(atol=1e-12, rtol=1e-12, max_steps=3)(counting_model([]), GaussianLinear(),
                                                         latents(10))


@pytest.mark.parametrize('path', ['linear', 'gvp', 'vp'])
def test_interpolant_paths_and_predictions(path):
    """Through the real transports, the ODE samplers follow the exact flow from the top of
    the transport's sampling interval to its bottom."""
    z = latents(200)
    for prediction in ('velocity', 'noise', 'score'):
        transport = interpolants.Interpolant(path, prediction)
        (t_min, t_max), fn = transport.sample_interval, exact_output(transport)
        a_min, b_min = (float(c) for c in transport.alpha_sigma(t_min))
        a_max, b_max = (float(c) for c in transport.alpha_sigma(t_max))
        var_min, var_max = a_min ** 2 * S * S + b_min ** 2, a_max ** 2 * S * S + b_max ** 2
        exact = a_min * MU + math.sqrt(var_min / var_max) * (z - a_max * MU)
        out = AdaptiveODE(atol=1e-9, rtol=1e-9)(fn, transport, z.clone())
        assert torch.allclose(out, exact, atol=1e-6), (prediction, (out - exact).abs().max())
        heun = HeunODE(num_steps=100)(fn, transport, z.clone())
        assert torch.allclose(heun, exact, atol=1e-3), (prediction, (heun - exact).abs().max())


# ------------------------------------------------------------------------- likelihood
MU2 = torch.tensor([1.0, -0.5], dtype=torch.float64)
L2 = torch.tensor([[0.6, 0.0], [0.4, 0.3]], dtype=torch.float64)  # data covariance L L^T


def correlated_velocity(x, t):
    """Exact velocity for x0 ~ N(MU2, L2 L2^T) on the linear path (a full 2x2 Jacobian):
    v = -MU2 + (t I - a Sigma) V^-1 (x - a MU2), V = a^2 Sigma + t^2 I."""
    a, sigma, eye = 1 - t, L2 @ L2.T, torch.eye(2, dtype=torch.float64)
    gain = torch.linalg.solve(a * a * sigma + t * t * eye, t * eye - a * sigma)
    return -MU2 + (x - a * MU2) @ gain


def jagged_data():
    """Six 2-D tokens in three images of 1, 2 and 3 tokens, and each image's log p."""
    x0 = MU2 + torch.randn(6, 2, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64) @ L2.T
    ids = torch.tensor([0, 1, 1, 2, 2, 2])
    per_token = torch.distributions.MultivariateNormal(MU2, L2 @ L2.T).log_prob(x0)
    return x0, ids, torch.zeros(3, dtype=torch.float64).index_add_(0, ids, per_token)


def test_exact_likelihood_matches_the_gaussian_density_per_image():
    x0, ids, expected = jagged_data()
    with torch.no_grad():  # works inside no_grad (SiT's needs grad mode globally off)
        logp, info = ode_likelihood(correlated_velocity, x0, ids, divergence='exact',
                                    atol=1e-8, rtol=1e-6, return_info=True)
    assert logp.shape == (3,)
    assert torch.allclose(logp, expected, atol=1e-5), (logp, expected)
    # the flow is linear, x1 = M (x0 - MU2), and whitens the data: M Sigma M^T = I
    m = torch.linalg.lstsq(x0 - MU2, info['x1']).solution.T
    assert torch.allclose(m @ L2 @ L2.T @ m.T, torch.eye(2, dtype=torch.float64), atol=1e-5)
    fixed = ode_likelihood(correlated_velocity, x0, ids, solver='heun', num_steps=50)
    assert torch.allclose(fixed, expected, atol=3e-3)


def test_hutchinson_is_seeded_unbiased_and_exact_for_a_diagonal_jacobian():
    x0, ids, expected = jagged_data()
    run = dict(divergence='hutchinson', atol=1e-7, rtol=1e-5)
    one = ode_likelihood(correlated_velocity, x0, ids, seed=3, **run)
    assert torch.equal(one, ode_likelihood(correlated_velocity, x0, ids, seed=3, **run))
    assert (one - expected).abs().max() > 0.1  # one probe is noisy here...
    errors = torch.stack([ode_likelihood(correlated_velocity, x0, ids, num_probes=8, seed=s,
                                         **run) - expected for s in range(8)])
    spread = errors.std(0) / math.sqrt(len(errors))
    assert ((errors.mean(0)).abs() <= 5 * spread + 1e-4).all(), (errors.mean(0), spread)
    # ...but with a diagonal Jacobian a Rademacher probe gives the trace exactly
    z = MU + S * latents(6, seed=4)
    diagonal = ode_likelihood(GaussianLinear.exact_velocity, z, seed=5, **run)
    closed = torch.distributions.Normal(MU, S).log_prob(z).squeeze(1)
    assert torch.allclose(diagonal, closed, atol=1e-4)


def test_likelihood_bad_arguments():
    x0, ids, _ = jagged_data()
    with pytest.raises(ValueError, match='divergence'):
        ode_likelihood(correlated_velocity, x0, ids, divergence='skilling')
    with pytest.raises(ValueError, match='solver'):
        ode_likelihood(correlated_velocity, x0, ids, solver='rk45')
