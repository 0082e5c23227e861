"""DiT's transformer block, conditioned by adaptive LayerNorm (adaLN-Zero)."""
import torch.nn as nn

from flexgen.registry import MODELS
from ..layers import Attention, gate, modulate
from .base import TransformerBlock


def build_modulation(cfg, hidden_size, num_chunks):
    """A modulation layer (``AdaLNZero`` by default) of ``num_chunks * hidden_size`` outputs."""
    cfg = dict(cfg or dict(type='AdaLNZero'))
    cfg.setdefault('hidden_size', hidden_size)
    cfg.setdefault('num_chunks', num_chunks)
    return MODELS.build(cfg)


@MODELS.register_module()
class AdaLNZeroBlock(TransformerBlock):
    """DiT block (Peebles & Xie 2023, Fig. 3):

    ``x += g1 * Attn(LN(x) * (1 + s1) + b1)``, ``x += g2 * MLP(LN(x) * (1 + s2) + b2)``,
    with ``(b1, s1, g1, b2, s2, g2)`` from the image's conditioning vector. Parameter names
    (``norm1``, ``attn``, ``norm2``, ``mlp``, ``adaLN_modulation``) follow DiT.
    """

    modulation_chunks = 6

    def __init__(self, hidden_size, num_heads, mlp=dict(type='GeluMlp'), qk_norm=None,
                 qkv_bias=True, modulation=dict(type='AdaLNZero'), attn_backend='sdpa'):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                              backend=attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MODELS.build(dict(mlp, dim=hidden_size))
        self.adaLN_modulation = build_modulation(modulation, hidden_size,
                                                 self.modulation_chunks)

    def forward(self, x, c, batch, rope=None, extra_modulation=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.modulations(c, extra_modulation)
        h = self.attn(modulate(self.norm1(x), shift_msa, scale_msa, batch), batch, rope)
        x = x + gate(h, gate_msa, batch)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp, batch))
        return x + gate(h, gate_mlp, batch)
