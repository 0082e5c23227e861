"""Stochastic interpolants between data and Gaussian noise (Albergo & Vanden-Eijnden 2023;
SiT, Ma et al. 2024), written in flexgen's time (t = 0 data, t = 1 noise):

    x_t = a(t) x0 + b(t) eps,        eps ~ N(0, I),

a :class:`~flexgen.transports.gaussian.GaussianTransport` (velocity, score, denoised and
the reverse SDE follow from a, b, a', b').

SiT's time runs the other way (s = 1 - t, s = 0 noise): its alpha_s, sigma_s are our
a(1 - s), b(1 - s), its velocity is minus ours. Paths (SiT transport/path.py):

    'linear'  a = 1 - t,            b = t                              (SiT "Linear", ICPlan)
    'gvp'     a = cos(pi t / 2),    b = sin(pi t / 2)                  (SiT "GVP")
    'vp'      a = exp(m),           b = sqrt(1 - exp(2 m)),            (SiT "VP", VPCPlan)
              m(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2,  beta(t) = beta_min +
              t (beta_max - beta_min), so a'/a = m' = -beta(t) / 2 (Song et al. 2021's VP-SDE).
"""
import math

import torch

from flexgen.registry import TRANSPORTS

from .gaussian import GaussianTransport, as_time, at_least_float32

_PATHS = {'linear': 'linear', 'gvp': 'gvp', 'vp': 'vp'}
_PREDICTIONS = ('velocity', 'noise', 'score')
_LOSS_WEIGHTS = (None, 'velocity', 'likelihood')


@TRANSPORTS.register_module()
class Interpolant(GaussianTransport):
    """SiT's transports (paths x predictions x loss weights) in flexgen time.

    Args:
        path: ``'linear'``, ``'gvp'`` or ``'vp'`` (SiT's ``'Linear'``, ``'GVP'``, ``'VP'``
            are accepted too).
        prediction: what the network outputs: ``'velocity'`` (``dx/dt``, flexgen sign),
            ``'noise'`` (``eps``) or ``'score'`` (``grad log p_t``).
        loss_weight: for noise / score prediction, SiT's weights with its ``lambda_t``
            (:meth:`drift_var`): ``None`` (1), ``'velocity'`` (``(lambda / b)^2``, the
            velocity-matching weight) or ``'likelihood'`` (``lambda / b^2``, the maximum
            likelihood weight of Song et al. 2021). SiT silently ignores it for velocity
            prediction; here that is an error.
        train_eps, sample_eps: keep t away from the singular ends. SiT's defaults (None):
            linear / GVP with velocity: 0 and 0; linear / GVP with noise / score: 1e-3 and
            1e-3; VP: 1e-5 and 1e-3. Intervals in flexgen time: linear / GVP
            ``[eps, 1 - eps]``, VP ``[eps, 1]`` (VP's b(0) = 0 is its only singular end).
            Unlike SiT, a value given here is always used (SiT forces 0 for velocity on
            linear / GVP, and its ``sample_eps`` default tests ``train_eps is None`` so
            ``sample_eps`` ends up None for VP / noise / score unless given).
        beta_min, beta_max: the VP path's ``beta(t)`` (SiT ``sigma_min=0.1, sigma_max=20``).
    """

    def __init__(self, path='linear', prediction='velocity', loss_weight=None,
                 train_eps=None, sample_eps=None, beta_min=0.1, beta_max=20.0):
        key = str(path).lower()
        if key not in _PATHS:
            raise ValueError(f"Interpolant: path must be 'linear', 'gvp' or 'vp', got {path!r}")
        if prediction not in _PREDICTIONS:
            raise ValueError(f'Interpolant: prediction must be one of {_PREDICTIONS}, '
                             f'got {prediction!r}')
        if loss_weight not in _LOSS_WEIGHTS:
            raise ValueError(f'Interpolant: loss_weight must be one of {_LOSS_WEIGHTS}, '
                             f'got {loss_weight!r}')
        if loss_weight is not None and prediction == 'velocity':
            raise ValueError(f'Interpolant: loss_weight={loss_weight!r} applies to noise / '
                             f"score prediction only (SiT ignores it for 'velocity')")
        self.path, self.prediction, self.loss_weight = _PATHS[key], prediction, loss_weight
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        if self.path == 'vp':
            default_train, default_sample = 1e-5, 1e-3
        elif prediction != 'velocity':
            default_train, default_sample = 1e-3, 1e-3
        else:
            default_train, default_sample = 0.0, 0.0
        self.train_eps = default_train if train_eps is None else float(train_eps)
        self.sample_eps = default_sample if sample_eps is None else float(sample_eps)
        for name in ('train_eps', 'sample_eps'):
            if not 0 <= getattr(self, name) < 0.5:
                raise ValueError(f'Interpolant: {name} must be in [0, 0.5), '
                                 f'got {getattr(self, name)}')

    def __repr__(self):
        return (f'{type(self).__name__}(path={self.path!r}, prediction={self.prediction!r}, '
                f'loss_weight={self.loss_weight!r}, train_eps={self.train_eps}, '
                f'sample_eps={self.sample_eps})')

    # -------------------------------------------------------------- intervals
    def _interval(self, eps):
        return (eps, 1.0) if self.path == 'vp' else (eps, 1.0 - eps)

    @property
    def train_interval(self):
        """Training times ``[t0, t1]`` in flexgen time (see ``train_eps``)."""
        return self._interval(self.train_eps)

    @property
    def sample_interval(self):
        """Sampling times ``[t0, t1]``: samplers integrate from ``t1`` down to ``t0``."""
        return self._interval(self.sample_eps)

    def _sbdm_t_max(self):
        return None if self.path == 'vp' else 1.0 - max(self.sample_eps, 1e-3)

    # -------------------------------------------------------------- path
    def _vp_m(self, t):
        """``log a(t)`` and its derivative for the VP path."""
        span = self.beta_max - self.beta_min
        return (-0.25 * span * t * t - 0.5 * self.beta_min * t,
                -0.5 * (self.beta_min + span * t))

    def alpha_sigma(self, t):
        """Data and noise coefficients ``(a(t), b(t))``."""
        t, dtype = as_time(t)
        if self.path == 'linear':
            a, b = 1 - t, t
        elif self.path == 'gvp':
            a, b = torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)
        else:
            m, _ = self._vp_m(t)
            a, b = torch.exp(m), torch.sqrt(-torch.expm1(2 * m))
        return a.to(dtype), b.to(dtype)

    def d_alpha_sigma(self, t):
        """``(a'(t), b'(t))`` (VP: ``b'`` is infinite at t = 0)."""
        t, dtype = as_time(t)
        if self.path == 'linear':
            da, db = -torch.ones_like(t), torch.ones_like(t)
        elif self.path == 'gvp':
            da = -0.5 * math.pi * torch.sin(0.5 * math.pi * t)
            db = 0.5 * math.pi * torch.cos(0.5 * math.pi * t)
        else:
            m, dm = self._vp_m(t)
            a2 = torch.exp(2 * m)
            da = dm * torch.exp(m)
            db = -a2 * dm / torch.sqrt(-torch.expm1(2 * m))
        return da.to(dtype), db.to(dtype)

    def drift_var(self, t):
        if self.path == 'vp':  # b b' - m' b^2 = -m' (a^2 + b^2): finite at t = 0 too
            t, dtype = as_time(t)
            return (-self._vp_m(t)[1]).to(dtype)
        return super().drift_var(t)

    # -------------------------------------------------------------- training
    def training_target(self, x0, noise, t):
        """The regression target: ``a' x0 + b' eps`` (velocity), ``eps`` (noise) or the
        conditional score ``-eps / b`` (score)."""
        if self.prediction == 'velocity':
            da, db = self.d_alpha_sigma(as_time(t)[0])
            return self._cast(da, x0) * x0 + self._cast(db, x0) * noise
        if self.prediction == 'noise':
            return noise
        return -noise / self._cast(self.alpha_sigma(as_time(t)[0])[1], noise)

    def loss_weight_at(self, t):
        """SiT's per-time loss weight ``w(t)`` (float64, shaped like ``t``)."""
        t, _ = as_time(t)
        if self.loss_weight is None:
            return torch.ones_like(t)
        b = self.alpha_sigma(t)[1]
        lam = self.drift_var(t)
        return (lam / b) ** 2 if self.loss_weight == 'velocity' else lam / (b * b)

    def loss(self, output, x0, noise, t):
        """Per-token loss ``[N]`` (mean over channels), in float32 or wider:
        velocity ``|v_theta - (a' x0 + b' eps)|^2``; noise ``w |eps_theta - eps|^2``;
        score ``w |b s_theta + eps|^2`` (SiT ``training_losses``)."""
        pred, x0, noise = at_least_float32(self._pred(output, x0), x0, noise)
        if self.prediction == 'velocity':
            return (pred - self.training_target(x0, noise, t)).pow(2).mean(-1)
        if self.prediction == 'noise':
            err = pred - noise
        else:
            err = self._cast(self.alpha_sigma(as_time(t)[0])[1], pred) * pred + noise
        weight = self._cast(self.loss_weight_at(t), err)
        return (weight * err.pow(2)).mean(-1)

    # -------------------------------------------------------------- sampling
    def x0_eps(self, output, x, t):
        """``(E[x0 | x], E[eps | x])``. From a velocity ``v = a' x0 + b' eps`` and
        ``x = a x0 + b eps``: ``x0 = (b' x - b v) / D``, ``eps = (a v - a' x) / D`` with
        ``D = a b' - a' b`` (1 on the linear path, pi/2 on GVP)."""
        pred = self._pred(output, x)
        t64, _ = as_time(t)
        a, b = (self._cast(c, x) for c in self.alpha_sigma(t64))
        if self.prediction == 'velocity':
            da, db = (self._cast(c, x) for c in self.d_alpha_sigma(t64))
            det = a * db - da * b
            return (db * x - b * pred) / det, (a * pred - da * x) / det
        eps = pred if self.prediction == 'noise' else -b * pred
        return (x - b * eps) / a, eps

    def velocity(self, output, x, t):
        if self.prediction == 'velocity':
            return self._pred(output, x)
        return super().velocity(output, x, t)

    def score(self, output, x, t):
        if self.prediction == 'score':
            return self._pred(output, x)
        return super().score(output, x, t)

    def velocity_score(self, output, x, t):
        if self.prediction == 'noise':
            return super().velocity_score(output, x, t)
        # the network outputs one of the two as is; only the other needs x0_eps
        return self.velocity(output, x, t), self.score(output, x, t)
