"""Discrete Gaussian diffusion (DDPM, Ho et al. 2020; improved DDPM / ADM, Nichol & Dhariwal
2021, Dhariwal & Nichol 2021), as DiT trains and samples it.

Forward process over steps k = 0..T-1 with variances beta_k:

    q(x_k | x0) = N(sqrt(abar_k) x0, (1 - abar_k) I),      abar_k = prod_{j <= k} (1 - beta_j).

Time: step k is flexgen time ``t = k / T`` (so t = 0 is the least noisy step, and a DiT
backbone with ``time_scale=T`` sees the integer k it was trained on, up to float rounding).
Training quantities (``interpolate``, ``training_target``, ``loss``) use the step
``k = round(t T)`` (clamped to 0..T-1; train with ``DiscreteUniformTime(T)``).
Sampler-facing quantities at arbitrary t (``alpha_sigma``, ``velocity``, ``score``,
``denoised``, for ODE / SDE samplers) use a continuous ``abar(t)``: ``log abar`` linearly
interpolated in ``k = t T`` between the table's entries (exact at every step, and linearly
extrapolated past k = T - 1 up to t = 1), so ``a(t) = sqrt(abar(t))``, ``b(t) = sqrt(1 - abar(t))``
and ``a' = a L' / 2``, ``b' = -abar L' / (2 b)`` with ``L = log abar`` piecewise linear.

Closed forms (ADM ``gaussian_diffusion.py``):

    posterior   q(x_{k-1} | x_k, x0) = N(c1_k x0 + c2_k x_k, btilde_k),
                btilde_k = beta_k (1 - abar_{k-1}) / (1 - abar_k),
                c1_k = beta_k sqrt(abar_{k-1}) / (1 - abar_k),
                c2_k = (1 - abar_{k-1}) sqrt(1 - beta_k) / (1 - abar_k),
                log btilde "clipped": log btilde_1 at k = 0 (btilde_0 = 0);
    model       p(x_{k-1} | x_k) = N(mu_theta, Sigma_theta), mu_theta = posterior mean at x0_hat;
                Sigma: 'fixed_small' btilde_k, 'fixed_large' beta_k (btilde_1 at k = 0),
                'learned_range' exp(f log beta_k + (1 - f) log btilde_k), f = (v + 1) / 2;
    VLB term    L_k = KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k)) (k > 0),
                L_0 = -log p(x0 | x_1) (discretised Gaussian, bins of width 2/255 on [-1, 1]),
                in bits per dimension.
"""
import math
from typing import List, Sequence, Union

import torch

from flexgen.registry import TRANSPORTS

from .gaussian import GaussianTransport, as_time, at_least_float32

_PREDICTIONS = ('eps', 'x0', 'v')
_VARIANCES = ('fixed_small', 'fixed_large', 'learned_range')
_LOSSES = ('mse', 'hybrid')
_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------- schedules
def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM's linear schedule scaled to T steps as in ADM / DiT:
    ``linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)`` (float64)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (ADM "squaredcos_cap_v2"):
    ``abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)``,
    ``beta_k = min(1 - abar((k + 1) / T) / abar(k / T), max_beta)``."""
    def abar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((k + 1) / num_timesteps) / abar(k / num_timesteps),
                             max_beta) for k in range(num_timesteps)], dtype=torch.float64)


def space_timesteps(num_timesteps: int, spec: Union[str, int, Sequence[int]]) -> List[int]:
    """The steps kept by ADM's respacing (``respace.space_timesteps``), sorted.

    - ``'ddimN'``: ``range(0, T, stride)`` for the smallest integer stride giving exactly N
      steps (``'ddim50'`` of 1000 -> 0, 20, ..., 980);
    - ``'N'`` or ``'N1,N2,...'`` (or ints): T is cut into len(counts) sections (the first
      ``T % len`` one step longer); section i keeps ``N_i`` steps at ``round(j * stride)``,
      stride ``(size - 1) / (N_i - 1)`` accumulated in floating point, Python rounding
      (``'250'`` of 1000 -> 0, 4, 8, ..., 991, 995, 999).
    """
    if isinstance(spec, str) and spec.startswith('ddim'):
        count = int(spec[len('ddim'):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        if count == num_timesteps == 1:
            return [0]
        raise ValueError(f'space_timesteps: cannot take exactly {count} of {num_timesteps} '
                         f'steps with an integer stride ({spec!r})')
    if isinstance(spec, str):
        counts = [int(c) for c in spec.split(',')]
    elif isinstance(spec, int):
        counts = [spec]
    else:
        counts = [int(c) for c in spec]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f'space_timesteps: cannot divide a section of {size} steps into '
                             f'{count} ({spec!r} of {num_timesteps})')
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return sorted(kept)


# ---------------------------------------------------------------------------- densities
def normal_kl(mean1, logvar1, mean2, logvar2):
    """``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale, bin_width=2.0 / 255):
    """``log P(x)`` for data on the grid of 256 levels in [-1, 1] under N(mean, e^{2 log_scale})
    integrated over x's bin, the edge bins extended to -inf / +inf (Ho et al. 2020 eq. 13).
    ADM evaluates the normal CDF with a tanh approximation; this uses the exact one, in
    float64, on whichever side of the mean the bin lies (no cancellation in the tails)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, mean.dtype), log_scale.dtype)
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 0.5 * bin_width)
    lower = inv_std * (x - mean - 0.5 * bin_width)
    log_cdf_upper = torch.special.log_ndtr(upper)     # log P(z < upper)
    log_sf_lower = torch.special.log_ndtr(-lower)     # log P(z > lower)
    # log(P(z < u) - P(z < l)) = log P(z < u) + log(1 - P(z < l) / P(z < u)), or the same with
    # survival functions when the bin lies above the mean.
    ratio_left = torch.exp(torch.special.log_ndtr(lower) - log_cdf_upper)
    ratio_right = torch.exp(torch.special.log_ndtr(-upper) - log_sf_lower)
    mid = torch.where(lower > 0,
                      log_sf_lower + torch.log1p(-ratio_right.clamp(max=1 - 1e-15)),
                      log_cdf_upper + torch.log1p(-ratio_left.clamp(max=1 - 1e-15)))
    out = torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, mid))
    return out.to(dtype)


# ---------------------------------------------------------------------------- schedule
class DiffusionSchedule:
    """The closed-form tables of a discrete diffusion with variances ``betas`` (float64).

    ``timesteps[i]`` is the original step of entry i (a respaced schedule keeps a subset of
    the training steps) and ``num_train_timesteps`` the original T, so entry i sits at
    flexgen time ``time(i) = timesteps[i] / T``.
    """

    def __init__(self, betas, timesteps=None, num_train_timesteps=None):
        betas = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
        if len(betas) == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f'DiffusionSchedule: betas must be a non-empty list in (0, 1], '
                             f'got {betas.tolist()[:8]}...')
        n = len(betas)
        self.betas = betas
        self.timesteps = (torch.arange(n) if timesteps is None
                          else torch.as_tensor(timesteps, dtype=torch.long).reshape(-1))
        self.num_train_timesteps = n if num_train_timesteps is None else int(num_train_timesteps)
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64),
                                              self.alphas_cumprod[:-1]])
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        # btilde_0 = 0: use btilde_1 (or beta_0 for a 1-step schedule) in the log
        first = self.posterior_variance[1:2] if n > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([first, self.posterior_variance[1:]]))
        self.large_variance = torch.cat([first, betas[1:]])
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / one_minus
        self._device_cache = {}

    def __len__(self):
        return len(self.betas)

    def time(self, i: int) -> float:
        """Flexgen time of entry ``i``: ``timesteps[i] / T``."""
        return int(self.timesteps[i]) / self.num_train_timesteps

    def get(self, name, i, like=None):
        """Table ``name`` at entries ``i`` (an int, or a long tensor such as ``[N, 1]``),
        float64 on ``i``'s (or ``like``'s) device."""
        device = i.device if isinstance(i, torch.Tensor) else (
            like.device if like is not None else torch.device('cpu'))
        key = (name, device)
        if key not in self._device_cache:
            self._device_cache[key] = getattr(self, name).to(device)
        return self._device_cache[key][i]

    def q_posterior(self, x0, xk, i):
        """Mean, variance and clipped log variance of ``q(x_{k-1} | x_k, x0)``."""
        mean = (self.get('posterior_mean_coef1', i, x0).to(x0.dtype) * x0
                + self.get('posterior_mean_coef2', i, x0).to(x0.dtype) * xk)
        return (mean, self.get('posterior_variance', i, x0),
                self.get('posterior_log_variance_clipped', i, x0))


def respaced_betas(alphas_cumprod, kept):
    """ADM ``SpacedDiffusion``: ``beta'_j = 1 - abar_{k_j} / abar_{k_{j-1}}``, abar_{k_{-1}} = 1."""
    abar = alphas_cumprod[torch.as_tensor(kept)]
    prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    return 1.0 - abar / prev


# ---------------------------------------------------------------------------- transport
@TRANSPORTS.register_module()
class DDPM(GaussianTransport):
    """DDPM / ADM Gaussian diffusion as a flexgen transport (DiT's defaults).

    Args:
        num_timesteps: T (default 1000; with an explicit ``beta_schedule`` list, T is its
            length and a different ``num_timesteps`` is an error).
        beta_schedule: ``'linear'`` (DDPM's 1e-4..0.02, scaled by 1000 / T as ADM / DiT),
            ``'cosine'`` (Nichol & Dhariwal) or an explicit list of betas.
        prediction: the network's mean output: ``'eps'`` (noise), ``'x0'`` (the clean data) or
            ``'v'`` (``sqrt(abar) eps - sqrt(1 - abar) x0``, Salimans & Ho 2022).
        variance: ``'fixed_small'`` (btilde), ``'fixed_large'`` (beta) or ``'learned_range'``
            (the network's columns after the first D hold v in [-1, 1]; ADM / DiT
            ``learn_sigma``).
        loss: ``'mse'`` (``|pred - target|^2``) or ``'hybrid'`` (MSE + the step's VLB term in
            bits, computed with the predicted mean detached so that it trains only the
            variance; IDDPM's L_simple + L_vlb / T with lambda = 1/T, as DiT trains).
            Default: ``'hybrid'`` with ``'learned_range'`` (ADM always adds the VB term to a
            learned variance), else ``'mse'``.
        vlb_decoder: the VLB term at step 0: ``'discretized'`` (ADM's discretised Gaussian
            NLL for data on 256 levels in [-1, 1], which DiT also applies to its latents) or
            ``'kl'`` (the KL term with the clipped posterior variance, for continuous data).
    """

    def __init__(self, num_timesteps=None, beta_schedule='linear', prediction='eps',
                 variance='learned_range', loss=None, vlb_decoder='discretized'):
        if isinstance(beta_schedule, str):
            T = 1000 if num_timesteps is None else int(num_timesteps)
            if T < 2:
                raise ValueError(f'DDPM: num_timesteps must be >= 2, got {num_timesteps}')
            if beta_schedule == 'linear':
                betas = linear_betas(T)
            elif beta_schedule == 'cosine':
                betas = cosine_betas(T)
            else:
                raise ValueError(f"DDPM: beta_schedule must be 'linear', 'cosine' or a list "
                                 f'of betas, got {beta_schedule!r}')
        else:
            betas = torch.as_tensor(beta_schedule, dtype=torch.float64).reshape(-1)
            if num_timesteps is not None and int(num_timesteps) != len(betas):
                raise ValueError(f'DDPM: num_timesteps={num_timesteps} but beta_schedule has '
                                 f'{len(betas)} entries')
            if len(betas) < 2:
                raise ValueError('DDPM: beta_schedule needs at least 2 betas')
        if prediction not in _PREDICTIONS:
            raise ValueError(f'DDPM: prediction must be one of {_PREDICTIONS}, got {prediction!r}')
        if variance not in _VARIANCES:
            raise ValueError(f'DDPM: variance must be one of {_VARIANCES}, got {variance!r}')
        loss = loss if loss is not None else (
            'hybrid' if variance == 'learned_range' else 'mse')
        if loss not in _LOSSES:
            raise ValueError(f'DDPM: loss must be one of {_LOSSES}, got {loss!r}')
        if loss == 'hybrid' and variance != 'learned_range':
            raise ValueError(f"DDPM: loss='hybrid' trains a learned variance; it needs "
                             f"variance='learned_range', got {variance!r}")
        if vlb_decoder not in ('discretized', 'kl'):
            raise ValueError(f"DDPM: vlb_decoder must be 'discretized' or 'kl', "
                             f'got {vlb_decoder!r}')
        self.schedule = DiffusionSchedule(betas)
        self.num_timesteps = len(betas)
        self.beta_schedule = beta_schedule if isinstance(beta_schedule, str) else 'explicit'
        self.prediction, self.variance, self.loss_type = prediction, variance, loss
        self.vlb_decoder = vlb_decoder
        self._log_abar = torch.log(self.schedule.alphas_cumprod)
        self._log_abar_cache = {}

    def __repr__(self):
        return (f'DDPM(num_timesteps={self.num_timesteps}, beta_schedule={self.beta_schedule!r}, '
                f'prediction={self.prediction!r}, variance={self.variance!r}, '
                f'loss={self.loss_type!r})')

    @property
    def learned_variance(self):
        return self.variance == 'learned_range'

    @property
    def sample_interval(self):
        """``(0, (T - 1) / T)``: the trained steps. ODE samplers may start at t = 1 (an
        extrapolated step beyond the last one)."""
        return 0.0, (self.num_timesteps - 1) / self.num_timesteps

    def respace(self, spec) -> DiffusionSchedule:
        """The schedule restricted to the steps ``space_timesteps(T, spec)`` keeps, with
        the respaced betas (ADM ``SpacedDiffusion``); ``spec``: ``'250'``, ``'ddim50'``,
        ``'10,15,20'``, an int, or None / '' for all T steps."""
        if spec in (None, ''):
            return self.schedule
        kept = space_timesteps(self.num_timesteps, spec)
        return DiffusionSchedule(respaced_betas(self.schedule.alphas_cumprod, kept), kept,
                                 self.num_timesteps)

    # -------------------------------------------------------------- discrete steps
    def step_index(self, t):
        """Flexgen time -> training step ``k = round(t T)`` (long, clamped to 0..T-1)."""
        if isinstance(t, torch.Tensor):
            return torch.round(t.double() * self.num_timesteps).long().clamp(
                0, self.num_timesteps - 1)
        return min(max(int(round(float(t) * self.num_timesteps)), 0), self.num_timesteps - 1)

    def _step_coefs(self, t, like):
        k = self.step_index(t)
        abar = self.schedule.get('alphas_cumprod', k, like)
        return abar.sqrt().to(like.dtype), (1.0 - abar).sqrt().to(like.dtype)

    def interpolate(self, x0, noise, t):
        """``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps`` at step ``k = round(t T)``."""
        a, b = self._step_coefs(t, x0)
        return a * x0 + b * noise

    def training_target(self, x0, noise, t):
        """``eps``, ``x0`` or ``v = sqrt(abar_k) eps - sqrt(1 - abar_k) x0``."""
        if self.prediction == 'eps':
            return noise
        if self.prediction == 'x0':
            return x0
        a, b = self._step_coefs(t, x0)
        return a * noise - b * x0

    def _variance_values(self, output, width):
        if output.shape[-1] < 2 * width:
            raise ValueError(f"DDPM(variance='learned_range') needs the network's variance "
                             f'columns: output has {output.shape[-1]} columns for {width}-wide '
                             f'tokens, expected {2 * width} (a learn_sigma backbone)')
        return output[..., width:2 * width]

    def loss(self, output, x0, noise, t):
        """Per-token loss ``[N]`` (float32 or wider): the mean over channels of
        ``(pred - target)^2``, plus (``'hybrid'``) the step's VLB term in bits per
        dimension with the mean prediction detached."""
        width = x0.shape[-1]
        pred, x0, noise = at_least_float32(output[..., :width], x0, noise)
        mse = (pred - self.training_target(x0, noise, t)).pow(2).mean(-1)
        if self.loss_type == 'mse':
            return mse
        frozen = torch.cat([pred.detach(), self._variance_values(output, width).to(pred.dtype)], -1)
        k = self.step_index(t)
        return mse + self.vlb_terms(frozen, x0, self.interpolate(x0, noise, t), k)

    # -------------------------------------------------------------- model distribution
    def x0_eps_at(self, output, x, i, schedule=None):
        """``(x0_hat, eps_hat)`` at entry ``i`` of ``schedule`` (default: all T steps)."""
        schedule = schedule or self.schedule
        abar = schedule.get('alphas_cumprod', i, x)
        return self._x0_eps(self._pred(output, x), x, abar.sqrt().to(x.dtype),
                            (1.0 - abar).sqrt().to(x.dtype))

    def _x0_eps(self, pred, x, a, b):
        if self.prediction == 'eps':
            return (x - b * pred) / a, pred
        if self.prediction == 'x0':
            return pred, (x - a * pred) / b
        return a * x - b * pred, b * x + a * pred  # a^2 + b^2 = 1

    def model_log_variance(self, output, x, i, schedule=None):
        """``log Sigma_theta`` at entry ``i`` (learned: ``f log beta + (1 - f) log btilde``,
        ``f = (v + 1) / 2``); float64 ``[.., 1]`` for fixed variances, x's dtype if learned."""
        schedule = schedule or self.schedule
        if self.variance == 'fixed_small':
            return schedule.get('posterior_log_variance_clipped', i, x)
        if self.variance == 'fixed_large':
            return torch.log(schedule.get('large_variance', i, x))
        frac = (self._variance_values(output, x.shape[-1]) + 1) / 2
        min_log = schedule.get('posterior_log_variance_clipped', i, x).to(frac.dtype)
        max_log = torch.log(schedule.get('betas', i, x)).to(frac.dtype)
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, output, x, i, schedule=None, clip_denoised=False):
        """``(mean, log_variance, x0_hat)`` of ``p(x_{k-1} | x_k)`` at entry ``i`` of
        ``schedule``; ``clip_denoised`` clamps x0_hat to [-1, 1] (pixel data)."""
        schedule = schedule or self.schedule
        x0, _ = self.x0_eps_at(output, x, i, schedule)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = schedule.q_posterior(x0, x, i)
        return mean, self.model_log_variance(output, x, i, schedule), x0

    def vlb_terms(self, output, x0, xk, i, schedule=None):
        """The VLB term of entry ``i`` per token ``[N]`` in bits per dimension:
        ``KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k))`` for i > 0, and at i = 0 the
        discretised decoder NLL (``vlb_decoder='discretized'``) or the same KL."""
        schedule = schedule or self.schedule
        true_mean, _, true_logvar = schedule.q_posterior(x0, xk, i)
        mean, logvar, _ = self.p_mean_variance(output, xk, i, schedule)
        kl = normal_kl(true_mean, true_logvar.to(mean.dtype), mean,
                       logvar.to(mean.dtype)).mean(-1) / _LN2
        if self.vlb_decoder == 'kl':
            return kl
        nll = -discretized_gaussian_log_likelihood(
            x0, mean, 0.5 * logvar.to(mean.dtype)).mean(-1) / _LN2
        first = torch.as_tensor(i, device=kl.device).reshape(-1)
        first = (first == 0) if first.numel() == kl.numel() else (first == 0).expand_as(kl)
        return torch.where(first, nll, kl)

    # -------------------------------------------------------------- continuous time
    def _log_abar_at(self, t):
        """``(L, dL/dt)``, ``L = log abar`` interpolated linearly in ``k = t T``."""
        T = self.num_timesteps
        table = self._log_abar_cache.setdefault(t.device, self._log_abar.to(t.device))
        kf = t * T
        j = (torch.ceil(kf) - 1).clamp(0, T - 2).long()
        lo, hi = table[j], table[j + 1]
        return lo + (kf - j) * (hi - lo), T * (hi - lo)

    def alpha_sigma(self, t):
        """``(sqrt(abar(t)), sqrt(1 - abar(t)))`` with the continuous ``abar(t)``."""
        t, dtype = as_time(t)
        log_abar, _ = self._log_abar_at(t)
        return torch.exp(0.5 * log_abar).to(dtype), torch.sqrt(-torch.expm1(log_abar)).to(dtype)

    def d_alpha_sigma(self, t):
        t, dtype = as_time(t)
        log_abar, slope = self._log_abar_at(t)
        abar = torch.exp(log_abar)
        return ((0.5 * slope * abar.sqrt()).to(dtype),
                (-0.5 * slope * abar / torch.sqrt(-torch.expm1(log_abar))).to(dtype))

    def drift_var(self, t):
        """``lambda(t) = -L'(t) / 2`` (the discrete analogue of VP's ``beta(t) / 2``)."""
        t, dtype = as_time(t)
        return (-0.5 * self._log_abar_at(t)[1]).to(dtype)

    def x0_eps(self, output, x, t):
        a, b = (self._cast(c, x) for c in self.alpha_sigma(as_time(t)[0]))
        return self._x0_eps(self._pred(output, x), x, a, b)
