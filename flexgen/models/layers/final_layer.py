"""DiT's output layer: modulated LayerNorm and a linear map to each token's patch values."""
import torch.nn as nn

from flexgen.registry import MODELS
from .modulation import AdaLNZero, modulate, zero_linear


@MODELS.register_module()
class FinalLayer(nn.Module):
    """``Linear(LN(x) * (1 + s) + b)`` to ``p*p*C_out`` values per token (DiT).

    FlexDiT's output part: built with ``hidden_size`` and ``out_features``;
    ``forward(x [N, D], c [B, D], batch) -> [N, out_features]``. :meth:`init_weights`
    zeroes the modulation and the linear map (the model starts by predicting zero).
    """

    def __init__(self, hidden_size, out_features):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = AdaLNZero(hidden_size, num_chunks=2)

    def init_weights(self):
        self.adaLN_modulation.init_weights()
        zero_linear(self.linear)

    def forward(self, x, c, batch):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale, batch))
