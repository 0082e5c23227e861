"""Rectified flow: the linear interpolant between data and Gaussian noise.

Liu et al. 2023 (rectified flow), Lipman et al. 2023 (flow matching), SiT's "Linear" path.
In flexgen's convention (t = 0 data, t = 1 noise):

    x_t = (1 - t) x_0 + t eps,     v = dx_t / dt = eps - x_0,

and the network is trained to predict ``v`` with ``|v_theta(x_t, t) - v|^2``.
"""
from flexgen.registry import TRANSPORTS


@TRANSPORTS.register_module()
class RectifiedFlow:
    """Linear interpolant with velocity prediction.

    A transport tells the generator how to make a training pair and how to read the
    network's output during sampling; all tensors here are per token ``[N, D]`` with
    times already broadcast to tokens ``[N, 1]``.
    """

    prediction = 'velocity'

    def alpha_sigma(self, t):
        """Data and noise coefficients ``(alpha_t, sigma_t) = (1 - t, t)``."""
        return 1 - t, t

    def interpolate(self, x0, noise, t):
        alpha, sigma = self.alpha_sigma(t)
        return alpha * x0 + sigma * noise

    def training_target(self, x0, noise, t):
        return noise - x0

    def loss(self, output, x0, noise, t):
        """Per-token squared error ``[N]`` (mean over channels)."""
        return (output.float() - self.training_target(x0, noise, t).float()).pow(2).mean(-1)

    def velocity(self, output, x, t):
        """``dx/dt`` at ``(x, t)`` from the network output (its first ``x.shape[-1]``
        columns; any further columns, e.g. a learned variance, are not a velocity)."""
        return output[..., :x.shape[-1]]
