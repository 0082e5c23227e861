"""Exact log-likelihood through the probability-flow ODE (Chen et al. 2018, FFJORD
(Grathwohl et al. 2019); Song et al. 2021, appendix D.2; SiT's ``sample_ode_likelihood``).

Along a solution of ``dx/dt = v(x, t)`` the density obeys ``d/dt log p_t(x_t) = -div v``,
so integrating data -> noise from ``x_0`` (t = t_min) to ``x_1`` (t = t_max):

    log p_0(x_0) = log N(x_1; 0, I) + integral_{t_min}^{t_max} div v(x_t, t) dt

in nats, summed over each image's elements (no dequantisation, no bits per dim). The
divergence is exact (one backward pass per element: small inputs only) or Hutchinson's
estimate ``e^T (dv/dx) e`` with Rademacher probes ``e`` (unbiased). The probes are drawn
once per solve (as FFJORD does), so the adaptive solver sees one deterministic ODE; SiT
draws a new probe at every evaluation.
"""
import math

import torch

from .ode import dopri5, euler, heun, rms_norm

DIVERGENCES = ('exact', 'hutchinson')
SOLVERS = ('dopri5', 'euler', 'heun')


def standard_normal_logp(x, image_ids, num_images):
    """``log N(x; 0, I)`` summed per image ``[B]``."""
    per_row = -0.5 * x.double().pow(2).reshape(len(x), -1).sum(1)
    count = torch.zeros(num_images, dtype=torch.float64, device=x.device)
    count.index_add_(0, image_ids, torch.full_like(per_row, x[0].numel()))
    total = torch.zeros(num_images, dtype=torch.float64, device=x.device)
    return total.index_add_(0, image_ids, per_row) - 0.5 * math.log(2 * math.pi) * count


def exact_divergence(v, x):
    """``diag(dv/dx)`` element by element, shaped like ``x`` (``v`` built from ``x``)."""
    diag = torch.zeros(x.numel(), dtype=v.dtype, device=v.device)
    flat = v.flatten()
    for k in range(flat.numel()):
        grad, = torch.autograd.grad(flat[k], x, retain_graph=True)
        diag[k] = grad.flatten()[k]
    return diag.view_as(x)


def hutchinson_divergence(v, x, probes):
    """Elementwise ``e * (e^T dv/dx)``, averaged over ``probes`` ``[P, *x.shape]``; its sum
    over an image is Hutchinson's estimate of that image's divergence."""
    total = torch.zeros_like(x)
    for i, e in enumerate(probes):
        grad, = torch.autograd.grad(v, x, e, retain_graph=i + 1 < len(probes))
        total = total + e * grad
    return total / len(probes)


def rademacher_probes(x, num_probes, seed=0, noise_like=None):
    """``num_probes`` sign vectors like ``x``: signs of ``noise_like(x)`` (per-image
    generators) if given, else of a normal draw seeded by ``seed``."""
    if noise_like is None:
        g = torch.Generator().manual_seed(int(seed))
        draws = [torch.randn(x.shape, generator=g) for _ in range(num_probes)]
    else:
        draws = [noise_like(x) for _ in range(num_probes)]
    return torch.stack([torch.where(d >= 0, 1.0, -1.0) for d in draws]).to(x)


def ode_likelihood(velocity_fn, x0, image_ids=None, num_images=None, divergence='exact',
                   num_probes=1, seed=0, noise_like=None, solver='dopri5', num_steps=100,
                   atol=1e-6, rtol=1e-3, t_min=0.0, t_max=1.0, return_info=False):
    """``log p(x0)`` per image (nats, float64 ``[B]``) under the probability-flow ODE of
    ``velocity_fn(x, t)`` (flexgen time; e.g. ``transport_velocity(model_fn, transport)``).

    Args:
        x0: data rows ``[N, ...]``.
        image_ids: the image of each row ``[N]`` (``TokenBatch.image_ids`` for tokens);
            ``None``: every row is one image.
        num_images: number of images (default ``image_ids.max() + 1``).
        divergence: ``'exact'`` or ``'hutchinson'`` (with ``num_probes`` Rademacher probes
            from ``seed`` or ``noise_like``).
        solver: ``'dopri5'`` (``atol``, ``rtol``; the error norm is the larger of the RMS
            over ``x`` and over the log-density terms, as torchdiffeq's for SiT's tuple
            state) or fixed-step ``'euler'`` / ``'heun'`` with ``num_steps``.
        t_min, t_max: integrate from ``t_min`` (data) to ``t_max`` (noise, prior N(0, I)).

    Runs with autograd enabled inside (also under ``torch.no_grad()``).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f'ode_likelihood: divergence must be one of {DIVERGENCES}, '
                         f'got {divergence!r}')
    if solver not in SOLVERS:
        raise ValueError(f'ode_likelihood: solver must be one of {SOLVERS}, got {solver!r}')
    if image_ids is None:
        image_ids = torch.arange(len(x0), device=x0.device)
    num_images = int(image_ids.max()) + 1 if num_images is None else int(num_images)
    probes = (rademacher_probes(x0, num_probes, seed, noise_like)
              if divergence == 'hutchinson' else None)
    n = x0.numel()

    def augmented(state, t):
        with torch.enable_grad():
            x = state[:n].view_as(x0).detach().requires_grad_(True)
            v = velocity_fn(x, t)
            div = (exact_divergence(v, x) if probes is None
                   else hutchinson_divergence(v, x, probes))
        per_image = torch.zeros(num_images, dtype=state.dtype, device=state.device)
        per_image.index_add_(0, image_ids, div.detach().reshape(len(x0), -1).sum(1).to(state.dtype))
        return torch.cat([v.detach().flatten().to(state.dtype), per_image])

    def mixed_norm(z):
        return torch.max(rms_norm(z[:n]), rms_norm(z[n:]))

    state = torch.cat([x0.detach().flatten(), x0.new_zeros(num_images)])
    info = {}
    if solver == 'dopri5':
        state, info = dopri5(augmented, state, t_min, t_max, atol, rtol, norm=mixed_norm,
                             return_info=True)
    else:
        times = torch.linspace(t_min, t_max, num_steps + 1, dtype=torch.float64)
        state = (euler if solver == 'euler' else heun)(augmented, state, times)
    x1 = state[:n].view_as(x0)
    logp = standard_normal_logp(x1, image_ids, num_images) + state[n:].double()
    return (logp, dict(info, x1=x1)) if return_info else logp
