"""Gaussian transports: ``x_t = a(t) x0 + b(t) eps``, ``eps ~ N(0, I)``, with a(0) = 1,
b(0) = 0 (Albergo & Vanden-Eijnden 2023; SiT, Ma et al. 2024), in flexgen's time
(t = 0 data, t = 1 noise). Every quantity a sampler needs follows from (a, b, a', b') and
a model's estimate of E[x0 | x_t] or E[eps | x_t]:

    velocity   v = dx/dt = a' x0_hat + b' eps_hat         (probability-flow ODE, t: 1 -> 0)
    score      s = grad log p_t(x) = -eps_hat / b
    denoised   x0_hat = (x - b eps_hat) / a

and the reverse-time SDE with diffusion w(t) >= 0 (SiT eq. 9 in flexgen time, dt < 0):

    dx = [v - w s] dt + sqrt(2 w |dt|) z.
"""
import math

import torch

from .base import Transport

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


class GaussianTransport(Transport):
    """A transport with ``x_t = a(t) x0 + b(t) eps``: besides the :class:`Transport`
    methods it provides ``score``, ``velocity_score``, ``denoised``, ``drift_var`` and the
    reverse SDE's ``sde_diffusion`` / ``sde_drift`` (what the SDE samplers need), all
    derived from a subclass's ``alpha_sigma``, ``d_alpha_sigma`` and ``x0_eps(output, x, t)``.
    ``interpolate`` and ``velocity`` are defined here; ``training_target`` and ``loss``
    are the subclass's.

    Coefficients are computed in float64 from ``t`` (a python float or a tensor
    broadcastable against the tokens, e.g. ``[N, 1]``) and cast to the tokens' dtype.
    Network outputs may carry extra columns (a learned variance) after the first
    ``x.shape[-1]``: they are ignored here.
    """

    prediction = None

    # -------------------------------------------------------------- to implement
    def alpha_sigma(self, t):
        """Data and noise coefficients ``(a(t), b(t))``."""
        raise self._missing('alpha_sigma')

    def d_alpha_sigma(self, t):
        """Their time derivatives ``(a'(t), b'(t))``."""
        raise self._missing('d_alpha_sigma')

    def x0_eps(self, output, x, t):
        """``(E[x0 | x], E[eps | x])`` from the network output at ``(x, t)``."""
        raise self._missing('x0_eps')

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
        return self._velocity_of(x0, eps, x, t)

    def score(self, output, x, t):
        """``grad_x log p_t(x) = -E[eps | x] / b(t)``."""
        return self._score_of(self.x0_eps(output, x, t)[1], x, t)

    def velocity_score(self, output, x, t):
        """``(velocity, score)`` at ``(x, t)`` from one ``x0_eps`` conversion (the reverse
        SDE needs both)."""
        x0, eps = self.x0_eps(output, x, t)
        return self._velocity_of(x0, eps, x, t), self._score_of(eps, x, t)

    def _velocity_of(self, x0, eps, x, t):
        """``v = a' x0_hat + b' eps_hat``."""
        da, db = self.d_alpha_sigma(as_time(t)[0])
        return self._cast(da, x) * x0 + self._cast(db, x) * eps

    def _score_of(self, eps, x, t):
        """``s = -eps_hat / b``."""
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
        velocity, score = self.velocity_score(output, x, t)
        return velocity - w * score
