"""The sampler contract: how a generator turns noise into data with a trained network.

A sampler is registered in ``SAMPLERS`` and called as

    sampler(model_fn, transport, noise, noise_like=None, callback=None) -> x0

- ``model_fn(x, t)``: the network (already wrapped by guidance, if any) on tokens ``x``
  ``[N, D]`` at flexgen time ``t`` (a python float; t = 1 noise, t = 0 data);
- ``transport``: the :class:`~flexgen.transports.Transport` the network was trained with;
  read the network's output through it (``transport.velocity(out, x, t)``). A sampler
  that needs more than the base contract checks with ``isinstance`` and says what it needs;
- ``noise``: the starting tokens ``[N, D]`` at the top of the sampling interval;
- ``noise_like(x)``: fresh standard-normal noise shaped like ``x``, keyed per image by the
  generator. A stochastic sampler draws every noise through it and refuses ``None``
  with :func:`require_noise_like` (there is no fallback to the global RNG);
- ``callback(i, x)``: called after step ``i`` (previews, trajectories).

It returns the tokens at t = 0. Solvers are best written as pure functions of
``(velocity_fn, x, times)`` (:mod:`flexgen.samplers.ode`) that the class only wires up.
"""


class Sampler:
    """Base class of the samplers (see the module docstring for the contract)."""

    def __call__(self, model_fn, transport, noise, noise_like=None, callback=None):
        raise NotImplementedError(f'{type(self).__name__} does not implement __call__')


def require_noise_like(noise_like, sampler_name):
    """A stochastic sampler's noise comes from its caller (keyed per image by the
    generator), never from a sampler-side fallback."""
    if noise_like is None:
        raise ValueError(f'{sampler_name} draws noise at every step: pass noise_like '
                         f'(the generator gives each image its own keyed draws)')
