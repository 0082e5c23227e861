"""Rectified flow and the Euler sampler against closed forms on Gaussian data.

Data x0 ~ N(mu, s^2) per dimension, x_t = (1 - t) x0 + t eps. Then x_t is Gaussian with
mean a mu and variance a^2 s^2 + t^2 (a = 1 - t); the exact velocity is
v(x, t) = E[eps - x0 | x_t = x], and the exact probability-flow map from t = 1 is
x(0) = mu + s x(1).
"""
import torch

from flexgen.rng import KeyedDraws, mix
from flexgen.samplers import ClassifierFreeGuidance, EulerODE, time_grid
from flexgen.transports import LogitNormalTime, RectifiedFlow, UniformTime
from flexgen.structures import TokenBatch

MU, S = 1.5, 0.5


def exact_velocity(x, t):
    a = 1 - t
    var = a * a * S * S + t * t
    e_x0 = MU + a * S * S / var * (x - a * MU)
    e_eps = t / var * (x - a * MU)
    return e_eps - e_x0


def test_exact_velocity_minimises_the_training_loss():
    transport = RectifiedFlow()
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x0 = MU + S * torch.randn(n, 1, generator=g)
    eps = torch.randn(n, 1, generator=g)
    t = torch.full((n, 1), 0.3)
    xt = transport.interpolate(x0, eps, t)
    best = transport.loss(exact_velocity(xt, 0.3), x0, eps, t).mean()
    for delta in (0.05, -0.05):
        assert transport.loss(exact_velocity(xt, 0.3) + delta, x0, eps, t).mean() > best
    # the loss at the exact velocity is the conditional variance of eps - x0 given x_t
    a, var = 0.7, 0.7 ** 2 * S ** 2 + 0.3 ** 2
    closed_form = S ** 2 + 1 - (0.3 - a * S ** 2) ** 2 / var  # Var(u) - Cov(u, x)^2 / Var(x)
    assert abs(best.item() - closed_form) < 0.01


def test_euler_converges_at_first_order_to_the_exact_map():
    z = torch.randn(2000, 1, generator=torch.Generator().manual_seed(1))
    exact = MU + S * z
    errors = []
    for steps in (8, 16, 32, 64):
        out = EulerODE(num_steps=steps)(exact_velocity, RectifiedFlow(), z.clone())
        errors.append((out - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.7 < r < 2.3 for r in ratios), (errors, ratios)
    assert errors[-1] < 0.06


def test_shifted_time_grid():
    t = time_grid(4, shift=3.0)
    assert t[0] == 1 and t[-1] == 0
    assert torch.allclose(t[2], torch.tensor(3 * 0.5 / (1 + 2 * 0.5), dtype=torch.float64))


def test_time_samplers_moments_and_per_image_keys():
    draws = KeyedDraws(mix(3, 1, torch.arange(20000)))
    u = UniformTime()(draws)
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    ln = LogitNormalTime(mean=0.5, std=1.0)(draws)
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 1.0) < 0.03
    # an image's draw depends only on its own key
    again = UniformTime()(KeyedDraws(mix(3, 1, torch.tensor([7]))))
    assert again.item() == u[7].item()


def _fake_network(calls):
    def network(batch, t, y):
        calls.append(batch.num_images)
        # conditional output 1 + y, unconditional (y = null = 10) output 0, per column
        out = torch.where((y == 10)[:, None], torch.zeros(len(y), 1), 1.0 + y[:, None].float())
        return batch.per_token(out.expand(-1, batch.tokens.shape[1]))
    return network


def test_guidance_formula_interval_and_scale_one():
    batch = TokenBatch(torch.zeros(4 + 2, 8), torch.tensor([[2, 2], [1, 2]]))
    labels = torch.tensor([1, 2])
    calls = []
    cfg = ClassifierFreeGuidance(scale=3.0, interval=(0.2, 0.6))
    fn = cfg.wrap(_fake_network(calls), batch, labels, null_label=10, guided_width=4,
                  patch_area=4)
    inside = fn(batch.tokens, 0.5)
    assert calls[-1] == 4                              # both branches in one doubled batch
    expected = torch.tensor([[3 * 2.0] * 4 + [2.0] * 4] * 4 + [[3 * 3.0] * 4 + [3.0] * 4] * 2)
    assert torch.equal(inside, expected)               # u + s (c - u) on the first 4 columns
    outside = fn(batch.tokens, 0.8)
    assert calls[-1] == 2                              # unconditional branch skipped
    assert torch.equal(outside[:, 0], torch.tensor([2.0] * 4 + [3.0] * 2))
    one = ClassifierFreeGuidance(scale=1.0).wrap(_fake_network(calls), batch, labels, 10, 4, 4)
    assert torch.equal(one(batch.tokens, 0.5), outside)
    channel_0 = ClassifierFreeGuidance(scale=3.0, channels=(0,)).wrap(
        _fake_network(calls), batch, labels, 10, 8, 4)
    assert torch.equal(channel_0(batch.tokens, 0.5), expected)
