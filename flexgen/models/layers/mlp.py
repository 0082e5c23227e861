"""Feed-forward layers, as timm defines them (so checkpoint keys match timm's)."""
from functools import partial

import torch.nn as nn
from timm.layers import Mlp, SwiGLU

from flexgen.registry import MODELS


@MODELS.register_module()
class GeluMlp(Mlp):
    """``fc1 -> GELU(tanh) -> fc2`` (DiT, SiT, NiT)."""

    def __init__(self, dim, mlp_ratio=4.0, hidden_features=None, bias=True):
        super().__init__(dim, hidden_features or int(dim * mlp_ratio),
                         act_layer=partial(nn.GELU, approximate='tanh'), bias=bias)


@MODELS.register_module()
class SwiGLUMlp(SwiGLU):
    """``fc2(SiLU(fc1_g x) * fc1_x x)`` (Shazeer 2020; FiT). The hidden width keeps the
    parameter count of a ratio-``r`` GELU MLP (``int(r*D) * 2 // 3``) unless ``large``
    (FiTv1's ``swiglu_large``: ``int(r*D)``) or ``hidden_features`` is given."""

    def __init__(self, dim, mlp_ratio=4.0, large=False, hidden_features=None, bias=True):
        hidden = int(dim * mlp_ratio)
        super().__init__(dim, hidden_features or (hidden if large else hidden * 2 // 3),
                         bias=bias)
