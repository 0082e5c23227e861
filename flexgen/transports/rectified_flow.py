"""Rectified flow: the linear interpolant between data and Gaussian noise.

Liu et al. 2023 (rectified flow), Lipman et al. 2023 (flow matching), SiT's "Linear" path.
In flexgen's convention (t = 0 data, t = 1 noise):

    x_t = (1 - t) x_0 + t eps,     v = dx_t / dt = eps - x_0,

and the network is trained to predict ``v`` with ``|v_theta(x_t, t) - v|^2``.
"""
from flexgen.registry import TRANSPORTS

from .interpolants import Interpolant


@TRANSPORTS.register_module()
class RectifiedFlow(Interpolant):
    """``Interpolant(path='linear', prediction='velocity')``: the linear path with velocity
    prediction, trained and sampled on all of [0, 1].

    A transport tells the generator how to make a training pair and how to read the
    network's output during sampling; all tensors here are per token ``[N, D]`` with
    times already broadcast to tokens ``[N, 1]``.
    """

    def __init__(self, train_eps=0.0, sample_eps=0.0):
        super().__init__(path='linear', prediction='velocity', train_eps=train_eps,
                         sample_eps=sample_eps)

    def training_target(self, x0, noise, t):
        return noise - x0
