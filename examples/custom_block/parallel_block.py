"""A block of your own, registered into flexgen without forking it.

The parallel formulation of ViT-22B (Dehghani et al. 2023): attention and MLP read the
same normalised input and are added together, ``x += g_a * Attn(h) + g_m * MLP(h)`` with
``h = LN(x) * (1 + s) + b``: one modulation pair fewer, one LayerNorm fewer.
A config loads it with ``custom_imports`` (see parallel_block_demo.py).

It follows the block contract of :mod:`flexgen.models.blocks.base`: FlexDiT passes
``hidden_size``, ``num_heads`` and the shared options this constructor names (``mlp``,
``qk_norm``, ``modulation``, ``attn_backend``); ``modulation_chunks = 4`` sizes its
``adaLN_modulation`` (and a global modulation, if the backbone has one), which the base
class's ``init_weights`` zero-initialises.
"""
import torch.nn as nn

from flexgen.models.blocks import TransformerBlock
from flexgen.models.layers import Attention, gate, modulate
from flexgen.registry import MODELS


@MODELS.register_module()
class ParallelAdaLNBlock(TransformerBlock):

    modulation_chunks = 4

    def __init__(self, hidden_size, num_heads, mlp=dict(type='GeluMlp'), qk_norm=None,
                 modulation=dict(type='AdaLNZero'), attn_backend='sdpa'):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, backend=attn_backend)
        self.mlp = MODELS.build(dict(mlp, dim=hidden_size))
        self.adaLN_modulation = MODELS.build(
            dict(modulation, hidden_size=hidden_size, num_chunks=self.modulation_chunks))

    def forward(self, x, c, batch, rope=None, extra_modulation=None):
        shift, scale, gate_attn, gate_mlp = self.modulations(c, extra_modulation)
        h = modulate(self.norm(x), shift, scale, batch)
        return x + gate(self.attn(h, batch, rope), gate_attn, batch) + \
            gate(self.mlp(h), gate_mlp, batch)
