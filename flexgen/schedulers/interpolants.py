"""Stochastic interpolants between data and Gaussian noise (Albergo & Vanden-Eijnden 2023;
SiT, Ma et al. 2024), written in flexgen's time (t = 0 data, t = 1 noise):

    x_t = a(t) x0 + b(t) eps,        eps ~ N(0, I),

with a(0) = 1, b(0) = 0. Every quantity a sampler needs follows from (a, b, a', b') and a
model's estimate of E[x0 | x_t] or E[eps | x_t]:

    velocity   v = dx/dt = a' x0_hat + b' eps_hat         (probability-flow ODE, t: 1 -> 0)
    score      s = grad log p_t(x) = -eps_hat / b
    denoised   x0_hat = (x - b eps_hat) / a

and the reverse-time SDE with diffusion w(t) >= 0 (SiT eq. 9 in flexgen time, dt < 0):

    dx = [v - w s] dt + sqrt(2 w |dt|) z.

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

#: SiT's diffusion forms (``Sampler.sample_sde(diffusion_form=...)``).
DIFFUSION_FORMS = ('constant', 'SBDM', 'sigma', 'linear', 'decreasing', 'increasing-decreasing')


def as_time(t):
    """``t`` as a float64 tensor (python floats -> 0-d), plus the dtype to return in."""
    if isinstance(t, torch.Tensor):
        out_dtype = t.dtype if t.is_floating_point() else torch.float64
        return t.to(torch.float64), out_dtype
    return torch.tensor(float(t), dtype=torch.float64), torch.float64


def at_least_float32(*tensors):
    """The tensors in a common dtype no narrower than float32 (losses of bf16 / fp16
    activations are computed in float32)."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return tuple(x.to(dtype) for x in tensors)


class GaussianTransport:
    """What every Gaussian transport shares: the sampler-facing quantities derived from
    ``alpha_sigma``, ``d_alpha_sigma`` and a subclass's ``x0_eps(output, x, t)``.

    Coefficients are computed in float64 from ``t`` (a python float or a tensor
    broadcastable against the tokens, e.g. ``[N, 1]``) and cast to the tokens' dtype.
    Network outputs may carry extra columns (a learned variance) after the first
    ``x.shape[-1]``: they are ignored here.
    """

    prediction = None

    # -------------------------------------------------------------- to implement
    def alpha_sigma(self, t):
        raise NotImplementedError

    def d_alpha_sigma(self, t):
        raise NotImplementedError

    def x0_eps(self, output, x, t):
        """``(E[x0 | x], E[eps | x])`` from the network output at ``(x, t)``."""
        raise NotImplementedError

    # -------------------------------------------------------------- shared
    @staticmethod
    def _pred(output, x):
        return output[..., :x.shape[-1]]

    @staticmethod
    def _cast(coef, like):
        return coef.to(device=like.device, dtype=like.dtype)

    def drift_var(self, t):
        """SiT's ``lambda_t`` (``compute_drift(...)[1]``), in flexgen time:
        ``lambda = b b' - (a'/a) b^2``, so that ``v = (a'/a) x - lambda * score``."""
        t, dtype = as_time(t)
        a, b = self.alpha_sigma(t)
        da, db = self.d_alpha_sigma(t)
        return (b * db - da / a * b * b).to(dtype)

    def velocity(self, output, x, t):
        """``dx/dt`` of the probability-flow ODE at ``(x, t)``."""
        x0, eps = self.x0_eps(output, x, t)
        t64, _ = as_time(t)
        da, db = self.d_alpha_sigma(t64)
        return self._cast(da, x) * x0 + self._cast(db, x) * eps

    def score(self, output, x, t):
        """``grad_x log p_t(x) = -E[eps | x] / b(t)``."""
        _, eps = self.x0_eps(output, x, t)
        _, b = self.alpha_sigma(as_time(t)[0])
        return -eps / self._cast(b, x)

    def denoised(self, output, x, t):
        """``E[x0 | x_t = x]``."""
        return self.x0_eps(output, x, t)[0]

    def interpolate(self, x0, noise, t):
        """``x_t = a(t) x0 + b(t) eps``."""
        a, b = self.alpha_sigma(as_time(t)[0])
        return self._cast(a, x0) * x0 + self._cast(b, x0) * noise

    # -------------------------------------------------------------- SDE
    def _sbdm_t_max(self):
        """The largest t at which SBDM's lambda is evaluated (None: finite everywhere)."""
        return None

    def sde_diffusion(self, x, t, form='sigma', norm=1.0):
        """The diffusion ``w(t)`` of the reverse SDE ``dx = [v - w s] dt + sqrt(2 w |dt|) z``
        for SiT's ``diffusion_form`` (``compute_diffusion``), written in flexgen time
        (SiT's ``s`` is ``1 - t``; ``n`` is ``norm``):

        - ``'constant'``: ``w = n``. (SiT returns a python float and its sampler then fails
          with a TypeError in ``torch.sqrt``; here it is a tensor.)
        - ``'SBDM'``: ``w = n lambda(t)`` (``drift_var``), the diffusion of score-based
          diffusion models: linear ``n t / (1 - t)``, GVP ``n (pi/2) tan(pi t / 2)``, VP
          ``n beta(t) / 2``. It diverges where ``a(t) = 0`` (t = 1 for linear and GVP): SiT
          returns NaN there (its velocity models sample from exactly that endpoint). Here
          lambda is evaluated at ``min(t, 1 - max(sample_eps, 1e-3))`` on those paths, so it
          is finite on the whole sampling interval (the SDE stays stiff near t = 1: an
          Euler-Maruyama step needs ``w |dt| < 2``).
        - ``'sigma'``: ``w = n b(t)`` (REPA's SDE: ``w = t`` on the linear path).
        - ``'linear'``: ``w = n t`` (SiT ``n (1 - s)``).
        - ``'decreasing'``: ``w = (1 - n cos(pi t))^2 / 4`` (SiT ``(n cos(pi s) + 1)^2 / 4``;
          largest at the noise end).
        - ``'increasing-decreasing'``: ``w = n sin^2(pi t)`` (SiT cannot select it: its
          table spells the key "inccreasing-decreasing").

        Returns a tensor shaped like ``t`` in ``x``'s dtype and device.
        """
        t64, _ = as_time(t)
        if form == 'constant':
            w = torch.full_like(t64, float(norm))
        elif form == 'SBDM':
            t_max = self._sbdm_t_max()
            w = norm * self.drift_var(t64 if t_max is None else t64.clamp(max=t_max))
        elif form == 'sigma':
            w = norm * self.alpha_sigma(t64)[1]
        elif form == 'linear':
            w = norm * t64
        elif form == 'decreasing':
            w = 0.25 * (1 - norm * torch.cos(math.pi * t64)) ** 2
        elif form == 'increasing-decreasing':
            w = norm * torch.sin(math.pi * t64) ** 2
        else:
            raise ValueError(f'sde_diffusion: form must be one of {DIFFUSION_FORMS}, '
                             f'got {form!r}')
        return w.to(device=x.device, dtype=x.dtype)

    def sde_drift(self, output, x, t, form='sigma', norm=1.0):
        """``v - w s``: the drift of the reverse SDE in flexgen time (multiply by ``dt < 0``)."""
        w = self.sde_diffusion(x, t, form, norm)
        return self.velocity(output, x, t) - w * self.score(output, x, t)

    # -------------------------------------------------------------- time ranges
    train_interval = (0.0, 1.0)
    sample_interval = (0.0, 1.0)

    def train_time(self, t):
        """Map a time sampler's ``t`` in [0, 1] affinely onto ``train_interval``
        (SiT draws ``t ~ U[t0, t1]``; LightningDiT maps its logit-normal draws the same way)."""
        lo, hi = self.train_interval
        return t if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * t


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
