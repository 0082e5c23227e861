"""The guidance contract: how a sampler's ``model_fn`` is made from the network.

Guidance is registered in ``GUIDANCE`` and turns the network into the ``model_fn(x, t)``
a sampler calls (:mod:`flexgen.samplers.base`), once per :meth:`generate` call:

    guidance.wrap(network, batch, labels, null_label, guided_width, patch_area) -> model_fn

``network(batch, t [B], y [B])`` is the backbone on a jagged
:class:`~flexgen.structures.TokenBatch` (``batch.replace(x)`` puts the sampler's tokens
in ``batch``'s layout; ``batch.repeat(2)`` doubles it for two branches in one call),
``labels`` ``[B]`` the classes, ``null_label`` the class index of "no class",
``guided_width`` the output columns that are predictions (``(c, p1, p2)``-ordered, ``c``
channels of ``patch_area`` = p*p columns each; columns after them, e.g. a learned variance,
are never guided). :class:`Guidance` gives the shared arguments (``scale``, ``interval``,
``channels``) and the extrapolation ``weak + s (strong - weak)`` on the guided columns.
"""
import torch


class Guidance:
    """Base class of guidance (see the module docstring for the contract).

    Args:
        scale: guidance scale ``s``; 1 is the main (conditional) model alone, one
            evaluation per step.
        interval: ``(low, high)`` in flexgen time (t = 1 noise), both ends included;
            outside it, the main model alone.
        channels: latent channels to guide (DiT's legacy ``(0, 1, 2)``); ``None`` guides
            every predicted channel. Other channels and extra output columns (learned
            variance) come from the main (conditional) branch unchanged.
    """

    def __init__(self, scale=1.0, interval=(0.0, 1.0), channels=None):
        self.scale, self.interval = float(scale), tuple(float(v) for v in interval)
        if len(self.interval) != 2 or self.interval[0] > self.interval[1]:
            raise ValueError(f'{type(self).__name__}: interval must be (low, high) with '
                             f'low <= high, got {interval!r}')
        self.channels = None if channels is None else tuple(int(c) for c in channels)

    def active(self, t):
        low, high = self.interval
        return self.scale != 1.0 and low <= t <= high

    def columns(self, guided_width, patch_area):
        """Token columns to guide: ``(c, p1, p2)`` order puts channel ``c`` at columns
        ``c * p*p`` to ``(c + 1) * p*p``."""
        if self.channels is None:
            return slice(0, guided_width)
        return torch.cat([torch.arange(c * patch_area, (c + 1) * patch_area)
                          for c in self.channels])

    def combine(self, strong, weak, columns):
        """``strong`` with ``weak + s (strong - weak)`` on ``columns``."""
        out = strong.clone()
        out[:, columns] = weak[:, columns] + self.scale * (strong[:, columns] - weak[:, columns])
        return out

    def wrap(self, network, batch, labels, null_label, guided_width, patch_area):
        """``model_fn(x, t)`` for a sampler (see the module docstring)."""
        raise NotImplementedError(f'{type(self).__name__} does not implement wrap')
