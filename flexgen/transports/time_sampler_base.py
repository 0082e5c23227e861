"""The time-sampler contract: the training distribution of ``t`` in [0, 1] (t = 0 data,
t = 1 noise).

A time sampler is registered in ``TIME_SAMPLERS`` and called once per training step as

    sampler(draws, seqlens=None) -> t [B]

``draws`` is the step's :class:`~flexgen.rng.KeyedDraws` (one key ``(seed, step, index)``
per image): draw from it, e.g. ``draws.uniform(STREAM)`` or ``draws.normal(STREAM)``
``[B]``, so that an image's ``t`` depends on its key alone, never on the global RNG or on
what else is in the batch. ``seqlens`` ``[B]`` (tokens per image) is for samplers whose
distribution depends on the resolution. The transport maps the result onto its own
training interval (:meth:`~flexgen.transports.Transport.train_time`).
"""

#: The KeyedDraws stream every time sampler draws from.
STREAM = 'time'


class TimeSampler:
    """Base class of the time samplers (see the module docstring for the contract)."""

    def __call__(self, draws, seqlens=None):
        raise NotImplementedError(f'{type(self).__name__} does not implement __call__')
