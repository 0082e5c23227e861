"""SiT's interpolants in flexgen time against closed forms on Gaussian data.

Data x0 ~ N(MU, S^2) per dimension, x_t = a x0 + b eps: x_t ~ N(a MU, V), V = a^2 S^2 + b^2;
E[x0 | x] = MU + a S^2 / V (x - a MU), E[eps | x] = b / V (x - a MU), score -(x - a MU) / V.
"""
import math

import pytest
import torch

import flexgen.transports.interpolants  # noqa: F401  (registers Interpolant)
import flexgen.transports.rectified_flow  # noqa: F401
from flexgen.registry import TRANSPORTS, build
from flexgen.transports.gaussian import DIFFUSION_FORMS
from flexgen.transports.interpolants import Interpolant
from flexgen.transports.rectified_flow import RectifiedFlow

MU, S = 1.5, 0.5
PATHS = ('linear', 'gvp', 'vp')
PREDICTIONS = ('velocity', 'noise', 'score')


def gen(seed):
    return torch.Generator().manual_seed(seed)


def coefs(transport, t):
    a, b = (c.item() for c in transport.alpha_sigma(t))
    da, db = (c.item() for c in transport.d_alpha_sigma(t))
    return a, b, da, db


def exact_output(transport, x, t):
    """The exact network output for Gaussian data, and the exact (x0_hat, eps_hat)."""
    a, b, da, db = coefs(transport, t)
    var = a * a * S * S + b * b
    x0_hat = MU + a * S * S / var * (x - a * MU)
    eps_hat = b / var * (x - a * MU)
    out = {'velocity': da * x0_hat + db * eps_hat, 'noise': eps_hat,
           'score': -eps_hat / b}[transport.prediction]
    return out, x0_hat, eps_hat


# ------------------------------------------------------------------ paths
def test_paths_in_flexgen_time_equal_sit_paths_reversed():
    t = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
    s = 1 - t  # SiT time: s = 0 noise, s = 1 data
    sit = {
        'linear': (s, 1 - s, (1 - s) / s),
        'gvp': (torch.sin(math.pi * s / 2), torch.cos(math.pi * s / 2),
                math.pi / (2 * torch.tan(math.pi * s / 2))),
        'vp': None,
    }
    log_mean = -0.25 * (1 - s) ** 2 * (20 - 0.1) - 0.5 * (1 - s) * 0.1  # SiT VPCPlan
    sit['vp'] = (torch.exp(log_mean), torch.sqrt(1 - torch.exp(2 * log_mean)),
                 (0.1 + (1 - s) * (20 - 0.1)) / 2)
    for path in PATHS:
        tr = Interpolant(path)
        a, b = tr.alpha_sigma(t)
        alpha, sigma, lam = sit[path]
        assert torch.allclose(a, alpha, atol=1e-12) and torch.allclose(b, sigma, atol=1e-12)
        if path == 'gvp':  # SiT's lambda for GVP: alpha_ratio sigma^2 - sigma d_sigma
            sig, dsig = torch.cos(math.pi * s / 2), -math.pi / 2 * torch.sin(math.pi * s / 2)
            lam = lam * sig ** 2 - sig * dsig
        assert torch.allclose(tr.drift_var(t), lam, rtol=1e-9), path
        # derivatives against central differences
        h = 1e-6
        (a1, b1), (a2, b2) = tr.alpha_sigma(t - h), tr.alpha_sigma(t + h)
        da, db = tr.d_alpha_sigma(t)
        assert torch.allclose(da, (a2 - a1) / (2 * h), rtol=1e-6, atol=1e-8)
        assert torch.allclose(db, (b2 - b1) / (2 * h), rtol=1e-6, atol=1e-8)
        a0, b0 = tr.alpha_sigma(0.0)
        assert a0.item() == 1 and b0.item() == 0
    assert Interpolant('vp').alpha_sigma(1.0)[0].item() == pytest.approx(math.exp(-5.025))
    assert Interpolant('VP').drift_var(0.0).item() == pytest.approx(0.05)  # beta_min / 2


@pytest.mark.parametrize('path', PATHS)
def test_x_t_moments(path):
    tr = Interpolant(path)
    g = gen(0)
    n = 200_000
    x0 = MU + S * torch.randn(n, 1, generator=g)
    eps = torch.randn(n, 1, generator=g)
    for t in (0.1, 0.5, 0.9):
        a, b, _, _ = coefs(tr, t)
        xt = tr.interpolate(x0, eps, torch.full((n, 1), t))
        assert xt.mean().item() == pytest.approx(a * MU, abs=0.01)
        assert xt.var().item() == pytest.approx(a * a * S * S + b * b, rel=0.01)


# ------------------------------------------------------------------ readings of the output
@pytest.mark.parametrize('prediction', PREDICTIONS)
@pytest.mark.parametrize('path', PATHS)
def test_velocity_score_denoised_are_consistent(path, prediction):
    tr = Interpolant(path, prediction)
    x = torch.linspace(-2, 4, 13, dtype=torch.float64)[:, None]
    for t in (0.05, 0.3, 0.77, 0.95):
        a, b, da, db = coefs(tr, t)
        out, x0_hat, eps_hat = exact_output(tr, x, t)
        var = a * a * S * S + b * b
        denoised, score = tr.denoised(out, x, t), tr.score(out, x, t)
        assert torch.allclose(denoised, x0_hat, atol=1e-10)
        assert torch.allclose(score, -(x - a * MU) / var, atol=1e-10)
        assert torch.allclose(score, -(x - a * denoised) / b ** 2, atol=1e-10)
        assert torch.allclose(tr.velocity(out, x, t), da * x0_hat + db * eps_hat, atol=1e-10)
        # SiT's velocity from score: v = (a'/a) x - lambda s (its -drift_mean + lambda s)
        assert torch.allclose(tr.velocity(out, x, t),
                              da / a * x - tr.drift_var(t).item() * score, atol=1e-9)
        # per-token times [N, 1] and extra (variance) columns
        t_tok = torch.full_like(x, t)
        wide = torch.cat([out, torch.full_like(out, 7.0)], -1)
        assert torch.allclose(tr.velocity(wide, x, t_tok), tr.velocity(out, x, t), atol=1e-12)


@pytest.mark.parametrize('prediction', PREDICTIONS)
@pytest.mark.parametrize('path', PATHS)
def test_exact_prediction_minimises_the_loss(path, prediction):
    tr = Interpolant(path, prediction, loss_weight=None if prediction == 'velocity'
                     else 'likelihood')
    g = gen(1)
    n, t = 200_000, 0.3
    x0 = MU + S * torch.randn(n, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, generator=g, dtype=torch.float64)
    t_tok = torch.full((n, 1), t, dtype=torch.float64)
    xt = tr.interpolate(x0, eps, t_tok)
    out, _, _ = exact_output(tr, xt, t)
    best = tr.loss(out, x0, eps, t_tok).mean().item()
    for delta in (0.03, -0.03):
        assert tr.loss(out + delta, x0, eps, t_tok).mean().item() > best
    # the minimum is the weighted conditional variance of the target given x_t
    a, b, da, db = coefs(tr, t)
    var = a * a * S * S + b * b
    if prediction == 'velocity':  # u = a' x0 + b' eps
        cond_var = da * da * S * S + db * db - (a * da * S * S + b * db) ** 2 / var
    else:  # noise: Var(eps | x) = 1 - b^2 / V; score loss |b s + eps|^2 is the same
        cond_var = 1 - b * b / var
    weight = 1.0 if prediction == 'velocity' else tr.drift_var(t).item() / b ** 2
    assert best == pytest.approx(weight * cond_var, rel=0.01)


def test_loss_weights_follow_sit():
    t = torch.tensor([[0.2], [0.6]], dtype=torch.float64)
    for path in PATHS:
        plain = Interpolant(path, 'noise')
        b = plain.alpha_sigma(t)[1]
        lam = plain.drift_var(t)
        x0, eps = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
        out = torch.full((2, 3), 0.5, dtype=torch.float64)
        base = plain.loss(out, x0, eps, t)
        assert torch.allclose(base, torch.full((2,), 0.25, dtype=torch.float64))
        for weight, expected in (('velocity', (lam / b) ** 2), ('likelihood', lam / b ** 2)):
            tr = Interpolant(path, 'noise', loss_weight=weight)
            assert torch.allclose(tr.loss(out, x0, eps, t), base * expected[:, 0].float())
        score = Interpolant(path, 'score')  # |b s + eps|^2
        assert torch.allclose(score.loss(out, x0, eps, t), (b[:, 0] * 0.5) ** 2)
    lin = Interpolant('linear', 'noise', loss_weight='velocity')
    assert lin.loss_weight_at(0.5).item() == pytest.approx(4.0)  # (lambda / b)^2 = 1 / a^2
    with pytest.raises(ValueError, match='noise / score prediction only'):
        Interpolant('linear', 'velocity', loss_weight='likelihood')


# ------------------------------------------------------------------ eps and intervals
def test_sit_eps_defaults_and_intervals():
    cases = {('linear', 'velocity'): (0.0, 0.0), ('gvp', 'velocity'): (0.0, 0.0),
             ('linear', 'noise'): (1e-3, 1e-3), ('gvp', 'score'): (1e-3, 1e-3),
             ('vp', 'velocity'): (1e-5, 1e-3), ('vp', 'noise'): (1e-5, 1e-3)}
    for (path, prediction), (train_eps, sample_eps) in cases.items():
        tr = Interpolant(path, prediction)
        assert (tr.train_eps, tr.sample_eps) == (train_eps, sample_eps)
    assert Interpolant('linear', 'noise').sample_interval == (1e-3, 1 - 1e-3)
    assert Interpolant('vp').train_interval == (1e-5, 1.0)
    # an explicit train_eps keeps the default sample_eps (SiT would set it to None)
    tr = Interpolant('vp', train_eps=1e-4)
    assert (tr.train_eps, tr.sample_eps) == (1e-4, 1e-3)
    u = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(Interpolant('linear', 'noise').train_time(u),
                          torch.tensor([1e-3, 0.5, 1 - 1e-3]))
    assert Interpolant().train_time(u) is u


# ------------------------------------------------------------------ SDE diffusion
@pytest.mark.parametrize('prediction', PREDICTIONS)
@pytest.mark.parametrize('path', PATHS)
def test_every_diffusion_form_is_finite_on_the_sampling_interval(path, prediction):
    tr = Interpolant(path, prediction)
    lo, hi = tr.sample_eps, 1 - tr.sample_eps
    t = torch.cat([torch.linspace(lo, hi, 1001, dtype=torch.float64),
                   torch.tensor([lo, hi], dtype=torch.float64)])
    x = torch.zeros(1, dtype=torch.float32)
    for form in DIFFUSION_FORMS:
        for norm in (0.5, 1.0, 2.0):
            w = tr.sde_diffusion(x, t, form, norm)
            assert w.dtype == torch.float32 and w.shape == t.shape
            assert torch.isfinite(w).all() and (w >= 0).all(), (form, norm)


def test_diffusion_forms_closed_form():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    x = torch.zeros(1, dtype=torch.float64)
    lin, gvp, vp = Interpolant('linear'), Interpolant('gvp'), Interpolant('vp')
    assert torch.equal(lin.sde_diffusion(x, t, 'constant', 2.0), torch.full_like(t, 2.0))
    assert torch.allclose(lin.sde_diffusion(x, t, 'SBDM', 2.0), 2 * t / (1 - t))
    assert torch.allclose(gvp.sde_diffusion(x, t, 'SBDM'), math.pi / 2 * torch.tan(math.pi * t / 2))
    assert torch.allclose(vp.sde_diffusion(x, t, 'SBDM'), (0.1 + t * 19.9) / 2)
    assert torch.allclose(gvp.sde_diffusion(x, t, 'sigma', 3.0), 3 * torch.sin(math.pi * t / 2))
    assert torch.allclose(vp.sde_diffusion(x, t, 'linear', 3.0), 3 * t)
    s = 1 - t  # SiT's forms in its own time
    assert torch.allclose(lin.sde_diffusion(x, t, 'decreasing', 0.7),
                          0.25 * (0.7 * torch.cos(math.pi * s) + 1) ** 2)
    assert torch.allclose(lin.sde_diffusion(x, t, 'increasing-decreasing', 0.7),
                          0.7 * torch.sin(math.pi * s) ** 2)
    # SBDM at the linear path's noise end: clamped at 1 - max(sample_eps, 1e-3)
    assert lin.sde_diffusion(x, 1.0, 'SBDM').item() == pytest.approx(0.999 / 0.001)
    with pytest.raises(ValueError, match='form must be one of'):
        lin.sde_diffusion(x, t, 'inccreasing-decreasing')


@pytest.mark.parametrize('path, form', [('linear', 'sigma'), ('gvp', 'decreasing'),
                                        ('vp', 'SBDM')])
def test_reverse_sde_recovers_the_data(path, form):
    """Euler-Maruyama on dx = [v - w s] dt + sqrt(2 w |dt|) z from t1 to t0 with the exact
    velocity model; the last step is the mean (deterministic) step, as SiT's 'Mean'."""
    tr = Interpolant(path)
    g = gen(2)
    n, steps = 20_000, 400
    t0, t1 = 0.004, 1.0 - (1e-3 if path != 'vp' else 0.0)
    a1, b1, _, _ = coefs(tr, t1)
    x = a1 * MU + math.sqrt(a1 * a1 * S * S + b1 * b1) * torch.randn(n, 1, generator=g,
                                                                    dtype=torch.float64)
    times = torch.linspace(t1, t0, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        out, _, _ = exact_output(tr, x, t)
        dt = t_next - t
        w = tr.sde_diffusion(x, t, form).item()
        x = x + tr.sde_drift(out, x, t, form) * dt + math.sqrt(2 * w * -dt) * torch.randn(
            x.shape, generator=g, dtype=x.dtype)
    out, _, _ = exact_output(tr, x, t0)
    x = x + tr.velocity(out, x, t0) * (0.0 - t0)
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(S, rel=0.03)


# ------------------------------------------------------------------ rectified flow
def test_rectified_flow_is_the_linear_velocity_interpolant():
    rf = build(TRANSPORTS, dict(type='RectifiedFlow'))
    it = build(TRANSPORTS, dict(type='Interpolant', path='linear', prediction='velocity'))
    assert isinstance(rf, RectifiedFlow) and isinstance(rf, Interpolant)
    g = gen(3)
    x0, eps, out = (torch.randn(6, 4, generator=g) for _ in range(3))
    t = torch.rand(6, 1, generator=g)
    assert torch.equal(rf.training_target(x0, eps, t), eps - x0)
    assert torch.allclose(it.training_target(x0, eps, t), eps - x0)
    assert torch.allclose(rf.interpolate(x0, eps, t), (1 - t) * x0 + t * eps)
    assert torch.allclose(rf.loss(out, x0, eps, t), it.loss(out, x0, eps, t))
    assert torch.allclose(rf.loss(out, x0, eps, t), (out - (eps - x0)).pow(2).mean(-1))
    assert torch.equal(rf.velocity(torch.cat([out, out], -1), x0, 0.5), out)
    assert rf.train_interval == (0.0, 1.0) and rf.sample_interval == (0.0, 1.0)
