"""DDPM transport and its samplers against closed forms.

Gaussian data x0 ~ N(MU, S^2) per dimension: at step k (abar = abar_k, a = sqrt(abar),
b = sqrt(1 - abar)) the marginal is N(a MU, a^2 S^2 + b^2), the exact eps predictor is
E[eps | x] = b (x - a MU) / (a^2 S^2 + b^2), and the exact probability-flow map from step k
to the data is x0 = MU + S (x - a MU) / sqrt(a^2 S^2 + b^2).
"""
import math

import pytest
import torch

import flexgen.samplers.ddpm  # noqa: F401  (registers DDPMAncestral, DDIM)
import flexgen.transports.ddpm  # noqa: F401
from flexgen.registry import SAMPLERS, TRANSPORTS, build
from flexgen.samplers.ddpm import DDIM, DDPMAncestral
from flexgen.transports.ddpm import (DDPM, cosine_betas, discretized_gaussian_log_likelihood,
                                     linear_betas, space_timesteps)
from flexgen.transports.interpolants import Interpolant
from flexgen.structures import Geometry, unpatchify

MU, S = 1.5, 0.5


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ schedules and respacing
def test_linear_and_cosine_schedules():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    abar = torch.cumprod(1 - betas, 0)
    assert abar[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)  # DiT's abar_999
    short = linear_betas(250)  # ADM scales the endpoints by 1000 / T
    assert short[0].item() == pytest.approx(4e-4) and short[-1].item() == pytest.approx(0.08)

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    cos_abar = torch.cumprod(1 - cosine_betas(100), 0)
    for k in (0, 10, 50, 98):  # abar_k = f((k + 1) / T) / f(0) until the 0.999 cap
        assert cos_abar[k].item() == pytest.approx(f((k + 1) / 100) / f(0), rel=1e-9)
    assert cosine_betas(100)[-1].item() == 0.999


def test_space_timesteps_picks_the_reference_steps():
    # by hand from ADM's rule: stride (size - 1) / (count - 1) accumulated, Python round
    assert space_timesteps(10, '4') == [0, 3, 6, 9]
    assert space_timesteps(10, '3') == [0, 4, 9]          # round(4.5) = 4 (half to even)
    assert space_timesteps(10, '2,3') == [0, 4, 5, 7, 9]  # sections 0..4 and 5..9
    assert space_timesteps(11, '2,2') == [0, 5, 6, 10]    # first section one step longer
    assert space_timesteps(10, '1,1') == [0, 5]
    assert space_timesteps(10, 'ddim5') == [0, 2, 4, 6, 8]
    assert space_timesteps(10, 'ddim4') == [0, 3, 6, 9]
    assert space_timesteps(10, 'ddim3') == [0, 4, 8]
    assert space_timesteps(10, 10) == list(range(10))
    s250 = space_timesteps(1000, '250')
    assert len(s250) == 250 and s250[:4] == [0, 4, 8, 12] and s250[-3:] == [991, 995, 999]
    assert space_timesteps(1000, 'ddim50') == list(range(0, 1000, 20))
    s = space_timesteps(100, '10,15,20')
    assert s[:10] == [0, 4, 7, 11, 15, 18, 22, 26, 29, 33] and s[10:12] == [34, 36]
    assert s[-3:] == [96, 97, 99] and len(s) == 45
    with pytest.raises(ValueError, match='cannot divide'):
        space_timesteps(10, '11')
    with pytest.raises(ValueError, match='integer stride'):
        space_timesteps(1000, 'ddim300')


def test_respacing_keeps_abar_and_maps_times():
    transport = DDPM()
    sched = transport.respace('250')
    kept = space_timesteps(1000, '250')
    assert sched.timesteps.tolist() == kept
    assert torch.allclose(sched.alphas_cumprod, transport.schedule.alphas_cumprod[kept],
                          rtol=1e-12)
    assert sched.betas[0].item() == pytest.approx(1e-4)
    assert sched.betas[-1].item() == pytest.approx(0.0775, abs=1e-4)
    assert sched.time(249) == 0.999 and sched.time(1) == 0.004
    assert transport.respace(None) is transport.schedule


# ------------------------------------------------------------------ posterior and VLB
def bayes_posterior(transport, k, x0, xk):
    """q(x_{k-1} | x_k, x0) by Bayes: prior N(sqrt(abar_{k-1}) x0, 1 - abar_{k-1}),
    likelihood x_k | x_{k-1} ~ N(sqrt(1 - beta_k) x_{k-1}, beta_k)."""
    sched = transport.schedule
    beta = sched.betas[k].item()
    abar_prev = sched.alphas_cumprod[k - 1].item()
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    var = 1 / precision
    mean = var * (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(1 - beta) * xk / beta)
    return mean, var


@pytest.mark.parametrize('k', [1, 2, 10, 500, 999])
def test_posterior_mean_and_variance_match_bayes(k):
    transport = DDPM(variance='fixed_small')
    x0 = torch.tensor([[0.3], [-1.2]], dtype=torch.float64)
    xk = torch.tensor([[1.1], [0.4]], dtype=torch.float64)
    mean, var, logvar = transport.schedule.q_posterior(x0, xk, k)
    bayes_mean, bayes_var = bayes_posterior(transport, k, x0, xk)
    assert torch.allclose(mean, bayes_mean, rtol=1e-9, atol=1e-12)
    assert var.item() == pytest.approx(bayes_var, rel=1e-9)
    assert logvar.item() == pytest.approx(math.log(bayes_var), rel=1e-9)
    # step 0: the posterior is a point mass; its clipped log variance is btilde_1's
    assert transport.schedule.posterior_variance[0].item() == 0
    assert transport.schedule.posterior_log_variance_clipped[0].item() == pytest.approx(
        math.log(transport.schedule.posterior_variance[1].item()))


def test_vlb_terms_equal_a_direct_kl_and_decoder_nll():
    transport = DDPM(variance='learned_range', vlb_decoder='discretized')
    sched = transport.schedule
    g = gen(0)
    n, d = 6, 4
    x0 = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1
    xk = torch.randn(n, d, generator=g, dtype=torch.float64)
    output = torch.cat([torch.randn(n, d, generator=g, dtype=torch.float64),
                        torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1], -1)
    ks = torch.tensor([0, 1, 3, 100, 700, 999])[:, None]
    # step 0: data on the 256-level grid (both edge bins), x_0 close to the model's mean
    x0[0] = torch.tensor([-1.0, 1.0, 51 / 127.5 - 1, 200 / 127.5 - 1], dtype=torch.float64)
    abar0 = sched.alphas_cumprod[0].item()
    xk[0] = math.sqrt(abar0) * x0[0] + math.sqrt(1 - abar0) * (output[0, :d] + 0.5 * xk[0])
    got = transport.vlb_terms(output, x0, xk, ks)
    for row, k in enumerate(ks[:, 0].tolist()):
        abar = sched.alphas_cumprod[k].item()
        eps = output[row, :d]
        x0_hat = (xk[row] - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        frac = (output[row, d:] + 1) / 2
        log_btilde = sched.posterior_log_variance_clipped[k].item()
        model_var = torch.exp(frac * math.log(sched.betas[k].item()) + (1 - frac) * log_btilde)
        if k == 0:  # P(x0 in its bin of width 2/255) under N(x0_hat, model_var)
            model = torch.distributions.Normal(x0_hat, model_var.sqrt())
            hi = torch.where(x0[row] > 0.999, torch.ones(d, dtype=torch.float64),
                             model.cdf(x0[row] + 1 / 255))
            lo = torch.where(x0[row] < -0.999, torch.zeros(d, dtype=torch.float64),
                             model.cdf(x0[row] - 1 / 255))
            expected = -torch.log(hi - lo).mean() / math.log(2)
        else:
            true_mean, true_var = bayes_posterior(transport, k, x0[row], xk[row])
            model_mean, _ = bayes_posterior(transport, k, x0_hat, xk[row])
            kl = torch.distributions.kl_divergence(
                torch.distributions.Normal(true_mean, math.sqrt(true_var)),
                torch.distributions.Normal(model_mean, model_var.sqrt()))
            expected = kl.mean() / math.log(2)
        assert got[row].item() == pytest.approx(expected.item(), rel=1e-7), k
    # 'kl' at step 0: the KL against the clipped posterior variance instead of the decoder
    kl0 = DDPM(vlb_decoder='kl').vlb_terms(output[:1], x0[:1], xk[:1], 0)
    abar0 = sched.alphas_cumprod[0].item()
    x0_hat = (xk[0] - math.sqrt(1 - abar0) * output[0, :d]) / math.sqrt(abar0)
    log_clip = sched.posterior_log_variance_clipped[0].item()  # log btilde_1
    frac = (output[0, d:] + 1) / 2
    model_std = torch.exp(0.5 * (frac * math.log(sched.betas[0].item()) + (1 - frac) * log_clip))
    direct = torch.distributions.kl_divergence(  # q's mean at step 0 is x0 itself
        torch.distributions.Normal(x0[0], math.exp(0.5 * log_clip)),
        torch.distributions.Normal(x0_hat, model_std)).mean() / math.log(2)
    assert kl0.item() == pytest.approx(direct.item(), rel=1e-7)


def test_discretized_likelihood_sums_to_one_over_the_grid():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)[:, None]
    for mean, log_scale in ((0.2, -3.0), (-0.9, -1.0), (0.0, 1.0), (0.99, -6.0)):
        logp = discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert torch.exp(logp).sum().item() == pytest.approx(1.0, abs=1e-9)
    far = discretized_gaussian_log_likelihood(torch.tensor([0.5]), torch.tensor([-0.5]),
                                              torch.tensor([-4.0]))
    assert torch.isfinite(far).all() and far.item() < -1000  # 55 sigmas away, no -inf


def test_hybrid_loss_trains_the_variance_only_through_the_vlb():
    transport = DDPM()  # eps, learned_range, hybrid: DiT
    g = gen(1)
    n, d = 8, 4
    x0, noise = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    t = torch.tensor([0, 1, 5, 100, 300, 600, 900, 999])[:, None].float() / 1000
    output = torch.randn(n, 2 * d, generator=g, requires_grad=True)
    loss = transport.loss(output, x0, noise, t)
    mse = (output[:, :d] - noise).pow(2).mean(-1)
    vb = transport.vlb_terms(output.detach(), x0, transport.interpolate(x0, noise, t),
                             transport.step_index(t))
    assert torch.allclose(loss, mse + vb, rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    assert torch.allclose(output.grad[:, :d], 2 * (output[:, :d] - noise).detach() / d)
    assert (output.grad[:, d:].abs().sum(-1) > 0).all()
    assert transport.step_index(t)[:, 0].tolist() == [0, 1, 5, 100, 300, 600, 900, 999]
    with pytest.raises(ValueError, match='variance columns'):
        transport.loss(torch.zeros(n, d), x0, noise, t)
    with pytest.raises(ValueError, match="needs variance='learned_range'"):
        DDPM(variance='fixed_small', loss='hybrid')


@pytest.mark.parametrize('prediction', ['eps', 'x0', 'v'])
def test_targets_invert_to_x0_and_eps(prediction):
    transport = DDPM(prediction=prediction, variance='fixed_large')
    g = gen(2)
    x0, noise = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(
        5, 3, generator=g, dtype=torch.float64)
    k = torch.tensor([0, 7, 250, 640, 999])[:, None]
    t = k.double() / 1000
    abar = transport.schedule.alphas_cumprod[k]
    xt = transport.interpolate(x0, noise, t)
    assert torch.allclose(xt, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    target = transport.training_target(x0, noise, t)
    x0_hat, eps_hat = transport.x0_eps_at(target, xt, k)
    assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, noise, atol=1e-9)
    assert transport.loss(target, x0, noise, t).abs().max() < 1e-12
    # the continuous-time view agrees with the table on the grid
    assert torch.allclose(transport.denoised(target, xt, t), x0, atol=1e-9)


def test_every_step_survives_float32_time():
    transport = DDPM()
    k = torch.arange(1000)
    t32 = (k.float() / 1000)[:, None]
    assert torch.equal(transport.step_index(t32)[:, 0], k)
    a, b = transport.alpha_sigma(k.double() / 1000)
    abar = transport.schedule.alphas_cumprod
    assert torch.allclose(a, abar.sqrt(), rtol=1e-12) and torch.allclose(b, (1 - abar).sqrt())


# ------------------------------------------------------------------ continuous time
def exact_eps(transport, x, t):
    a, b = transport.alpha_sigma(t)
    return b * (x - a * MU) / (a * a * S * S + b * b)


def test_continuous_time_velocity_score_denoised():
    transport = DDPM(beta_schedule='cosine', variance='fixed_small')
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    for t in (0.0, 0.00013, 0.0004, 0.2371, 0.5, 0.99951, 1.0):
        a, b = transport.alpha_sigma(t)
        da, db = transport.d_alpha_sigma(t)
        if t not in (0.0, 0.0004, 0.5, 1.0):  # off the grid: central differences
            h = 1e-8
            (a1, b1), (a2, b2) = transport.alpha_sigma(t - h), transport.alpha_sigma(t + h)
            assert da.item() == pytest.approx(((a2 - a1) / (2 * h)).item(), rel=1e-6, abs=1e-8)
            assert db.item() == pytest.approx(((b2 - b1) / (2 * h)).item(), rel=1e-6, abs=1e-8)
        out = exact_eps(transport, x, t)
        var = a * a * S * S + b * b
        x0_hat = MU + a * S * S / var * (x - a * MU)
        assert torch.allclose(transport.denoised(out, x, t), x0_hat)
        assert torch.allclose(transport.score(out, x, t), -(x - a * MU) / var)
        assert torch.allclose(transport.velocity(out, x, t), da * x0_hat + db * out)
        lam = transport.drift_var(t)  # v = (a'/a) x - lambda * score
        assert torch.allclose(transport.velocity(out, x, t),
                              da / a * x - lam * transport.score(out, x, t))
    with_variance = torch.cat([out, torch.full_like(out, 9.0)], -1)  # extra columns ignored
    assert torch.allclose(transport.velocity(with_variance, x, 1.0),
                          transport.velocity(out, x, 1.0))


def test_euler_ode_on_the_continuous_velocity_reaches_the_exact_map():
    """The probability-flow ODE from t = 1 to t = 0 in the continuous abar(t) maps x to
    a0 MU + sqrt(V0 / V1) (x - a1 MU): Euler on ``transport.velocity`` converges to it."""
    from flexgen.samplers.ode import EulerODE
    transport = DDPM(variance='fixed_small')
    x = torch.randn(2000, 1, generator=gen(6), dtype=torch.float64)
    (a0, b0), (a1, b1) = transport.alpha_sigma(0.0), transport.alpha_sigma(1.0)
    v0, v1 = a0 * a0 * S * S + b0 * b0, a1 * a1 * S * S + b1 * b1
    exact = a0 * MU + (v0 / v1).sqrt() * (x - a1 * MU)
    errors = [(EulerODE(num_steps=n)(lambda y, t: exact_eps(transport, y, t), transport,
                                     x.clone()) - exact).abs().max().item() for n in (100, 400)]
    assert errors[1] < 0.35 * errors[0] and errors[1] < 0.02, errors


# ------------------------------------------------------------------ samplers on Gaussian data
def gaussian_model(transport, schedule=None, exact_variance=False):
    """The exact eps predictor (and, optionally, the exact reverse variance as
    learned_range values for ``schedule``'s steps)."""
    T = transport.num_timesteps
    abar_table = transport.schedule.alphas_cumprod
    times = []

    def model_fn(x, t):
        times.append(t)
        k = round(t * T)
        abar = abar_table[k].item()
        a, b = math.sqrt(abar), math.sqrt(1 - abar)
        eps = b * (x - a * MU) / (a * a * S * S + b * b)
        if not exact_variance:
            return eps
        i = schedule.timesteps.tolist().index(k)
        beta = schedule.betas[i].item()
        abar_prev = schedule.alphas_cumprod_prev[i].item()
        v_prev = abar_prev * S * S + 1 - abar_prev  # Var(x_prev); Var(x_prev | x_k) by Bayes:
        true_var = 1 / (1 / v_prev + (1 - beta) / beta)
        log_lo = schedule.posterior_log_variance_clipped[i].item()
        frac = (math.log(true_var) - log_lo) / (math.log(beta) - log_lo) if i > 0 else 0.0
        return torch.cat([eps, torch.full_like(eps, 2 * frac - 1)], -1)

    return model_fn, times


def start_marginal(transport, n, seed, k=None):
    k = transport.num_timesteps - 1 if k is None else k
    abar = transport.schedule.alphas_cumprod[k].item()
    a, b = math.sqrt(abar), math.sqrt(1 - abar)
    z = torch.randn(n, 1, generator=gen(seed), dtype=torch.float64)
    return a * MU + math.sqrt(a * a * S * S + b * b) * z, z, a, b


def test_ddim_eta0_converges_to_the_exact_map():
    transport = DDPM(variance='fixed_small')
    x, _, a, b = start_marginal(transport, 2000, 0)
    exact = MU + S * (x - a * MU) / math.sqrt(a * a * S * S + b * b)
    errors = []
    for steps in (50, 250, 1000):
        model_fn, times = gaussian_model(transport)
        out = DDIM(num_steps=steps)(model_fn, transport, x.clone())
        assert len(times) == steps and times[0] == 0.999 and times[-1] == 0.0
        errors.append((out - exact).abs().max().item())
    assert errors[0] > 3 * errors[1] > 9 * errors[2]  # first order in the step size
    assert errors[-1] < 0.01


def test_ancestral_with_the_exact_variance_is_exact_in_ten_steps():
    transport = DDPM(variance='learned_range')
    sampler = build(SAMPLERS, dict(type='DDPMAncestral', num_steps=10))
    schedule = transport.respace('10')
    model_fn, times = gaussian_model(transport, schedule, exact_variance=True)
    x, _, _, _ = start_marginal(transport, 200_000, 1)
    noise_gen = gen(2)
    steps = []
    out = sampler(model_fn, transport, x,
                  noise_like=lambda y: torch.randn(y.shape, generator=noise_gen, dtype=y.dtype),
                  callback=lambda i, y: steps.append(i))
    assert steps == list(range(10))
    assert times == [k / 1000 for k in reversed(space_timesteps(1000, '10'))]
    # the last step returns E[x0 | x at step 0]: variance S^2 * a0^2 S^2 / (a0^2 S^2 + b0^2)
    abar0 = transport.schedule.alphas_cumprod[0].item()
    expected_var = S * S * abar0 * S * S / (abar0 * S * S + 1 - abar0)
    assert out.mean().item() == pytest.approx(MU, abs=0.005)
    assert out.var().item() == pytest.approx(expected_var, rel=0.01)


def test_fixed_variances_bracket_the_data_variance_and_converge():
    """Var(x_{k-1} | x_k) lies between btilde_k (x0 known) and beta_k (x0 ~ N(0, 1)) when
    S <= 1 (Nichol & Dhariwal sec. 3.1): ancestral sampling with 'fixed_small' ends below
    S^2, 'fixed_large' above, both closer with more steps."""
    results = {}
    for variance in ('fixed_small', 'fixed_large'):
        transport = DDPM(variance=variance)
        for steps in (50, 100):
            model_fn, _ = gaussian_model(transport)
            x, _, _, _ = start_marginal(transport, 30_000, 3)
            noise_gen = gen(4)
            out = DDPMAncestral(num_steps=steps)(
                model_fn, transport, x.float(),
                noise_like=lambda y: torch.randn(y.shape, generator=noise_gen, dtype=y.dtype))
            assert out.mean().item() == pytest.approx(MU, abs=0.01)
            results[variance, steps] = out.var().item()
    assert (results['fixed_small', 50] < results['fixed_small', 100] < S * S
            < results['fixed_large', 100] < results['fixed_large', 50])
    assert results['fixed_small', 100] == pytest.approx(S * S, rel=0.15)
    assert results['fixed_large', 100] == pytest.approx(S * S, rel=0.06)


def test_samplers_need_a_ddpm_transport_and_noise():
    model_fn, _ = gaussian_model(DDPM())
    with pytest.raises(TypeError, match='DDPM transport'):
        DDIM()(model_fn, Interpolant(), torch.zeros(2, 1))
    with pytest.raises(ValueError, match='noise_like'):
        DDPMAncestral(num_steps=5)(model_fn, DDPM(variance='fixed_small'), torch.zeros(2, 1))
    assert isinstance(build(TRANSPORTS, dict(type='DDPM', prediction='v',
                                             variance='fixed_small')), DDPM)
    with pytest.raises(ValueError, match='beta_schedule has 3 entries'):
        DDPM(num_timesteps=1000, beta_schedule=[0.1, 0.2, 0.3])
    explicit = DDPM(beta_schedule=[0.1, 0.2, 0.3], variance='fixed_small')
    assert explicit.num_timesteps == 3


# ------------------------------------------------------------------ through the generator
def _ddpm_generator(sampler):
    from flexgen.models import DiffusionGenerator
    backbone = dict(type='FlexDiT', in_channels=3, patch_size=2, hidden_size=32, depth=2,
                    num_heads=2, num_classes=4, learn_sigma=True)
    return DiffusionGenerator(backbone=backbone, transport=dict(type='DDPM'),
                              time_sampler=dict(type='DiscreteUniformTime'), sampler=sampler)


def test_generator_trains_the_variance_head_with_the_hybrid_loss():
    from helpers import randomise
    torch.manual_seed(0)
    model = _ddpm_generator(dict(type='DDIM', num_steps=10))
    randomise(model.backbone)
    g = gen(5)
    images = [torch.randn(3, 4, 6, generator=g), torch.randn(3, 8, 4, generator=g)]
    loss = model.loss(images, dict(label=torch.tensor([0, 1]), index=torch.tensor([3, 4]),
                                   seed=0, step=0))['loss']
    loss.backward()
    head = model.backbone.final_layer.linear.weight.grad  # rows: (c, p1, p2), 2C channels
    assert torch.isfinite(loss) and head[12:].abs().sum() > 0 and head[:12].abs().sum() > 0


@pytest.mark.parametrize('sampler', [dict(type='DDIM', num_steps=250),
                                     dict(type='DDPMAncestral', num_steps=50)])
def test_generate_with_an_exact_eps_oracle(sampler):
    """DDIM lands on the exact map of each image's own noise; ancestral sampling gives an
    image the same result alone as inside a mixed batch (per-image noise draws)."""
    model = _ddpm_generator(sampler)
    mu, s = 0.5, 0.2
    abar_table = model.transport.schedule.alphas_cumprod

    def oracle(batch, t, y):
        k = torch.round(t.double() * 1000).long()
        abar = batch.per_token(abar_table[k])[:, None]
        a, b = abar.sqrt(), (1 - abar).sqrt()
        x = batch.tokens.double()
        eps = b * (x - a * mu) / (a * a * s * s + b * b)
        return torch.cat([eps, torch.zeros_like(eps)], -1).float()  # f = 1/2 variance

    model.network = oracle
    sizes = [(4, 6), (8, 4)]
    images = model.generate([0, 1], sizes, seeds=[11, 12])
    if sampler['type'] == 'DDIM':
        abar = abar_table[999].item()
        a, b = math.sqrt(abar), math.sqrt(1 - abar)
        geometry = Geometry(torch.tensor(sizes) // model.patch_size)
        noise = model.sampling_noise(torch.tensor([11, 12]), geometry, 0)
        for z, image in zip(unpatchify(noise, geometry.sizes, model.patch_size), images):
            exact = mu + s * (z - a * mu) / math.sqrt(a * a * s * s + b * b)
            torch.testing.assert_close(image, exact, atol=0.025, rtol=0)  # O(1) if miswired
    else:
        alone = model.generate([1], [sizes[1]], seeds=[12])[0]
        torch.testing.assert_close(alone, images[1], atol=1e-5, rtol=0)
        assert abs(images[0].mean().item() - mu) < 0.15
