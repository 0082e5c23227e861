"""The transport contract: what the generator and the samplers ask of a noise process.

A transport says how a training pair is made from data and noise and how the network's
output is read. Time is flexgen's (t in [0, 1], t = 0 data, t = 1 noise); tensors are per
token ``[N, D]`` and ``t`` is a python float or a tensor broadcastable against them
(``[N, 1]``).

Every transport provides, for training (the generator's ``loss``):

- ``train_interval`` and ``train_time(t)``: the times a time sampler's ``t`` in [0, 1]
  is mapped onto;
- ``interpolate(x0, noise, t)``: the noisy input ``x_t``;
- ``training_target(x0, noise, t)``: what the network regresses (NiT's direction loss
  compares the output with it);
- ``loss(output, x0, noise, t)``: the per-token loss ``[N]``;

and for generation (every sampler):

- ``sample_interval``: the times samplers integrate over, from its top down to its
  bottom;
- ``velocity(output, x, t)``: ``dx/dt`` of the probability-flow ODE (the ODE samplers).

More is a subclass, and a sampler that needs more checks for it with ``isinstance``:
:class:`~flexgen.transports.gaussian.GaussianTransport` (``x_t = a(t) x0 + b(t) eps``:
score, denoised estimate, reverse-SDE diffusion; the SDE samplers) and
:class:`~flexgen.transports.ddpm.DDPM` (discrete steps: respacing, the posterior; the
DDPM samplers).
"""


class Transport:
    """Base class of every transport (see the module docstring for the contract)."""

    train_interval = (0.0, 1.0)
    sample_interval = (0.0, 1.0)

    def train_time(self, t):
        """Map a time sampler's ``t`` in [0, 1] affinely onto ``train_interval``
        (SiT draws ``t ~ U[t0, t1]``; LightningDiT maps its logit-normal draws the same way)."""
        lo, hi = self.train_interval
        return t if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * t

    def _missing(self, method):
        owner = next(cls for cls in type(self).__mro__ if method in vars(cls))
        return NotImplementedError(f'{type(self).__name__} does not implement {method}, '
                                   f'which every {owner.__name__} provides')

    def interpolate(self, x0, noise, t):
        """The noisy input ``x_t`` at time ``t``."""
        raise self._missing('interpolate')

    def training_target(self, x0, noise, t):
        """What the network is trained to output for ``(x0, noise, t)``."""
        raise self._missing('training_target')

    def loss(self, output, x0, noise, t):
        """Per-token loss ``[N]`` of the network output at ``x_t``."""
        raise self._missing('loss')

    def velocity(self, output, x, t):
        """``dx/dt`` of the probability-flow ODE at ``(x, t)`` from the network output."""
        raise self._missing('velocity')
