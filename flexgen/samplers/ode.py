"""Probability-flow ODE samplers: integrate ``dx/dt = v(x, t)`` from t = 1 (noise) to
t = 0 (data) (Song et al. 2021; SiT, Ma et al. 2024, section 3).

Each solver is a short pure function of ``(velocity_fn, x, times)`` in the manner of
k-diffusion; the registered classes only turn a network into ``velocity_fn`` through the
transport and choose the time grid. ``velocity_fn(x, t)`` takes ``t`` as a python float.

Time grids: ``num_steps`` uniform steps, optionally warped by a time shift and cut short of
the ends by ``sample_eps`` (SiT samples noise / score predictions on ``[eps, 1 - eps]``,
where their conversion to a velocity divides by ``sigma_t`` or ``alpha_t``).
"""
import math
from typing import Callable, Optional, Sequence

import torch

from flexgen.registry import SAMPLERS
from flexgen.transports.time_samplers import time_shift

from .base import Sampler

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


# --------------------------------------------------------------------------- time grids
def eps_interval(sample_eps=0.0):
    """``(t_min, t_max)`` from ``sample_eps``: a float ``eps`` cuts both ends,
    ``[eps, 1 - eps]`` (SiT's Linear / GVP paths with noise or score prediction); a pair
    ``(data_eps, noise_eps)`` cuts each end on its own (SiT's VP path: ``(eps, 0)``)."""
    data_eps, noise_eps = ((sample_eps, sample_eps) if isinstance(sample_eps, (int, float))
                           else tuple(sample_eps))
    if not (0 <= data_eps < 0.5 and 0 <= noise_eps < 0.5):
        raise ValueError(f'sample_eps must be in [0, 0.5) (or a pair of such), got {sample_eps!r}')
    return float(data_eps), 1.0 - float(noise_eps)


def sampling_interval(sample_eps, transport):
    """``(t_min, t_max)``: from ``sample_eps`` if given, else the transport's
    ``sample_interval`` (``Interpolant`` follows SiT's defaults; no transport: ``(0, 1)``)."""
    if sample_eps is not None:
        return eps_interval(sample_eps)
    t_min, t_max = (0.0, 1.0) if transport is None else transport.sample_interval
    return float(t_min), float(t_max)


def time_grid(num_steps, shift=1.0, t_min=0.0, t_max=1.0):
    """``num_steps + 1`` decreasing float64 times from ``t_max`` to ``t_min``.

    A uniform grid ``u`` on [1, 0] is warped by the time shift
    :func:`~flexgen.transports.time_samplers.time_shift` (``shift > 1`` spends more steps
    near the noise) and then mapped onto ``[t_min, t_max]``, so the ends stay exact.
    LightningDiT's shift ``s`` is given in SiT's time (t = 0 noise): it equals flexgen's
    ``shift = 1 / s``.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}')
    if not shift > 0:
        raise ValueError(f'shift must be positive, got {shift!r}')
    u = time_shift(torch.linspace(1.0, 0.0, int(num_steps) + 1, dtype=torch.float64), shift)
    return t_min + (t_max - t_min) * u


# --------------------------------------------------------------------------- solvers
def euler(velocity_fn: VelocityFn, x, times, callback=None):
    """Euler's method ``x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k)`` over ``times``
    (decreasing to sample, increasing to encode). NFE = ``len(times) - 1``.

    Each step is the difference of the two times as ``x``'s precision (at least float32)
    holds them, as diffusers' ``FlowMatchEulerDiscreteScheduler`` takes it: on the same grid
    the two agree bitwise."""
    steps = times.to(torch.promote_types(x.dtype, torch.float32)).diff().tolist()
    for i, (t, dt) in enumerate(zip(times[:-1].tolist(), steps)):
        x = x + dt * velocity_fn(x, t)
        if callback is not None:
            callback(i, x)
    return x


def heun(velocity_fn: VelocityFn, x, times, callback=None, final_euler=True):
    """Heun's method (explicit trapezoid; Karras et al. 2022, EDM Alg. 1): predictor
    ``x' = x + h v(x, t)``, corrector ``x + h / 2 (v(x, t) + v(x', t_next))``.

    A step that ends exactly at t = 0 stays an Euler step when ``final_euler`` (as EDM and
    REPA do: a noise or score prediction gives no velocity at t = 0), so NFE is
    ``2 (len(times) - 1) - 1`` on a grid ending at 0 and ``2 (len(times) - 1)`` otherwise.
    """
    for i, (t, t_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist())):
        h = t_next - t
        d = velocity_fn(x, t)
        x_pred = x + h * d
        if t_next == 0 and final_euler:
            x = x_pred
        else:
            x = x + 0.5 * h * (d + velocity_fn(x_pred, t_next))
        if callback is not None:
            callback(i, x)
    return x


# Dormand & Prince 1980, RK5(4)7M: nodes, stage weights and the 5th order solution (FSAL).
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = ((),
         (1 / 5,),
         (3 / 40, 9 / 40),
         (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
# Error estimate = 5th minus 4th order solution, with Shampine's (1986) 4th order weights
# (1951/21600, 0, 22642/50085, 451/720, -12231/42400, 649/6300, 1/60), as torchdiffeq uses.
_DP_E = (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
         -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60)


def rms_norm(x):
    """Root mean square, torchdiffeq's default error norm."""
    return x.double().pow(2).mean().sqrt()


def _initial_step(f, s, x, k1, order, atol, rtol, norm, limit):
    """Hairer, Norsett & Wanner, 'Solving ODEs I', II.4 (as torchdiffeq picks it).
    Costs one evaluation."""
    scale = atol + rtol * x.abs()
    d0, d1 = float(norm(x / scale)), float(norm(k1 / scale))
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, limit)  # never probe beyond the end of the interval
    k2 = f(s + h0, x + h0 * k1)
    d2 = float(norm((k2 - k1) / scale)) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1)


def _next_step(h, ratio, safety, ifactor, dfactor, order=5):
    """torchdiffeq's step-size controller: ``h * min(ifactor, max(safety / ratio^(1/5),
    dfactor))``, never shrinking after an accepted step."""
    if ratio == 0:
        return h * ifactor
    if ratio < 1:
        dfactor = 1.0
    return h * min(ifactor, max(safety / ratio ** (1.0 / order), dfactor))


def dopri5(velocity_fn: VelocityFn, x, t_start, t_end, atol=1e-6, rtol=1e-3,
           stops: Sequence[float] = (), first_step=None, max_steps=100_000,
           norm=rms_norm, callback=None, safety=0.9, ifactor=10.0, dfactor=0.2,
           return_info=False):
    """Adaptive Dormand-Prince 5(4) from ``t_start`` to ``t_end`` (either direction).

    Error control as torchdiffeq's ``dopri5``: a step is accepted when
    ``norm(err / (atol + rtol * max(|x_k|, |x_{k+1}|))) <= 1`` with the RMS norm, the
    first step is chosen by Hairer's rule and the next by :func:`_next_step`. One
    difference: steps are shortened to land exactly on every time in ``stops`` and on
    ``t_end`` (torchdiffeq steps past its output times and interpolates), so the velocity
    is never evaluated outside ``[t_end, t_start]``.

    ``callback(i, x)`` runs at the ``i``-th stop when ``stops`` are given, else after each
    accepted step. NFE = 2 + 6 x (accepted + rejected steps) (one evaluation to start,
    one to choose the first step unless ``first_step`` is given; the last stage of a step
    is the first of the next).

    Returns ``x`` at ``t_end``, and with ``return_info`` also a dict with ``nfe``,
    ``accepted``, ``rejected`` and ``times`` (where each accepted step ended).
    """
    direction = 1.0 if t_end >= t_start else -1.0

    def f(s, y):  # integrate in s = direction * t so that steps are positive
        return direction * velocity_fn(y, direction * s)

    s, s_end = direction * float(t_start), direction * float(t_end)
    targets = sorted(direction * float(t) for t in stops if s < direction * float(t) < s_end)
    targets.append(s_end)
    info = dict(nfe=0, accepted=0, rejected=0, times=[])
    if s == s_end:
        return (x, info) if return_info else x
    k1 = f(s, x)
    info['nfe'] += 1
    if first_step is None:
        h = _initial_step(f, s, x, k1, 4, atol, rtol, norm, s_end - s)
        info['nfe'] += 1
    else:
        h = float(first_step)
    for index, target in enumerate(targets):
        while s < target:
            if info['accepted'] + info['rejected'] >= max_steps:
                raise RuntimeError(f'dopri5: more than max_steps={max_steps} steps between '
                                   f't={t_start} and t={t_end} (atol={atol}, rtol={rtol})')
            last = s + h >= target
            step = target - s if last else h
            if not step > 0 or s + step == s:
                raise RuntimeError(f'dopri5: step size underflow at t={direction * s}')
            ks = [k1]
            for c, a in zip(_DP_C[1:], _DP_A[1:]):
                y = x + step * sum(a_j * k_j for a_j, k_j in zip(a, ks) if a_j != 0)
                ks.append(f(target if (last and c == 1.0) else s + c * step, y))
            info['nfe'] += 6
            error = step * sum(e_j * k_j for e_j, k_j in zip(_DP_E, ks) if e_j != 0)
            ratio = float(norm(error / (atol + rtol * torch.max(x.abs(), y.abs()))))
            if not math.isfinite(ratio):
                raise RuntimeError(f'dopri5: non-finite values near t={direction * s}')
            if ratio <= 1:
                x, k1, s = y, ks[-1], (target if last else s + step)
                info['accepted'] += 1
                info['times'].append(direction * s)
                if callback is not None and not stops:
                    callback(info['accepted'] - 1, x)
            else:
                info['rejected'] += 1
            h = _next_step(step, ratio, safety, ifactor, dfactor)
        if callback is not None and stops:
            callback(index, x)
    return (x, info) if return_info else x


# --------------------------------------------------------------------------- samplers
def transport_velocity(model_fn, transport) -> VelocityFn:
    """``velocity_fn(x, t)`` from a network ``model_fn(x, t)`` read through a transport."""
    def velocity_fn(x, t):
        return transport.velocity(model_fn(x, t), x, t)
    return velocity_fn


class _FixedStepODE(Sampler):
    """Shared arguments of the fixed-grid ODE samplers.

    Args:
        num_steps: steps on the grid.
        shift: time shift of the grid (1 = uniform; see :func:`time_grid`).
        sample_eps: stop short of the ends (see :func:`eps_interval`); ``None`` takes
            the transport's ``sample_interval``.
    """

    def __init__(self, num_steps=50, shift=1.0, sample_eps=None):
        time_grid(num_steps, shift)  # validates
        if sample_eps is not None:
            eps_interval(sample_eps)
        self.num_steps, self.shift, self.sample_eps = int(num_steps), float(shift), sample_eps

    def times(self, transport=None):
        t_min, t_max = sampling_interval(self.sample_eps, transport)
        return time_grid(self.num_steps, self.shift, t_min, t_max)


@SAMPLERS.register_module()
class EulerODE(_FixedStepODE):
    """Euler ODE sampler: ``num_steps`` network evaluations (per guidance branch)."""

    def __call__(self, model_fn, transport, noise, noise_like=None, callback=None):
        return euler(transport_velocity(model_fn, transport), noise, self.times(transport),
                     callback)


@SAMPLERS.register_module()
class HeunODE(_FixedStepODE):
    """Heun ODE sampler (2nd order): ``2 num_steps - 1`` network evaluations on a grid that
    ends at t = 0 (the last step is Euler, see :func:`heun`), ``2 num_steps`` otherwise
    (``final_euler=False`` makes every step Heun's, as torchdiffeq's ``heun2`` in SiT)."""

    def __init__(self, num_steps=50, shift=1.0, sample_eps=None, final_euler=True):
        super().__init__(num_steps, shift, sample_eps)
        self.final_euler = bool(final_euler)

    def __call__(self, model_fn, transport, noise, noise_like=None, callback=None):
        return heun(transport_velocity(model_fn, transport), noise, self.times(transport),
                    callback, self.final_euler)


@SAMPLERS.register_module()
class AdaptiveODE(Sampler):
    """Adaptive Dormand-Prince 5(4) ODE sampler (SiT's default ``dopri5``), with
    torchdiffeq's ``atol`` / ``rtol`` semantics (see :func:`dopri5`).

    Args:
        atol, rtol: absolute and relative tolerances (SiT: 1e-6, 1e-3).
        num_steps: ``None`` lets the solver choose every step (``callback`` after each
            accepted step). An integer makes the solver also land on the ``num_steps + 1``
            (shifted) grid times and call ``callback`` there, like SiT's output grid
            (which the solver otherwise ignores): at least ``num_steps`` steps.
        shift, sample_eps: as for :class:`EulerODE`.
        max_steps: give up (RuntimeError) after this many steps.

    After a call, ``last_info`` holds ``nfe``, ``accepted`` and ``rejected``.
    """

    def __init__(self, atol=1e-6, rtol=1e-3, num_steps=None, shift=1.0, sample_eps=None,
                 max_steps=10_000):
        if not (atol >= 0 and rtol >= 0 and atol + rtol > 0):
            raise ValueError(f'AdaptiveODE: atol and rtol must be >= 0, not both 0; got '
                             f'atol={atol!r}, rtol={rtol!r}')
        if num_steps is not None:
            time_grid(num_steps, shift)
        if sample_eps is not None:
            eps_interval(sample_eps)
        self.atol, self.rtol, self.num_steps = float(atol), float(rtol), num_steps
        self.shift, self.sample_eps, self.max_steps = float(shift), sample_eps, int(max_steps)
        self.last_info: Optional[dict] = None

    def __call__(self, model_fn, transport, noise, noise_like=None, callback=None):
        t_min, t_max = sampling_interval(self.sample_eps, transport)
        stops = (time_grid(self.num_steps, self.shift, t_min, t_max)[1:].tolist()
                 if self.num_steps else ())
        x, self.last_info = dopri5(transport_velocity(model_fn, transport), noise, t_max,
                                   t_min, self.atol, self.rtol, stops=stops,
                                   max_steps=self.max_steps, callback=callback,
                                   return_info=True)
        return x
