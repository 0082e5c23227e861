"""Token, timestep and class embeddings (DiT, Peebles & Xie 2023, section 3.2)."""
import math

import torch
import torch.nn as nn

from flexgen.registry import MODELS


@MODELS.register_module()
class PatchEmbed(nn.Module):
    """Linear map of flattened ``(c, p1, p2)`` patches to the model width.

    Equal to DiT's ``Conv2d(C, D, p, stride=p)`` on the image (its weight viewed as
    ``[D, C*p*p]``), but it works on a jagged token batch of any image sizes.

    FlexDiT's patch embedding part: built with ``in_channels``, ``patch_size`` and
    ``hidden_size``; ``forward(tokens [N, C*p*p]) -> [N, D]``. Its initialisation is the
    backbone's default (xavier-uniform, zero bias).
    """

    def __init__(self, in_channels, patch_size, hidden_size, bias=True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size ** 2, hidden_size, bias=bias)

    def forward(self, tokens):
        return self.proj(tokens)


def timestep_embedding(t, dim, max_period=10000.0):
    """GLIDE / DiT sinusoid: ``[cos(t f_i), sin(t f_i)]``, ``f_i = max_period^(-i/half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


@MODELS.register_module()
class TimestepEmbedder(nn.Module):
    """Sinusoid of the (model-time) timestep, then ``Linear -> SiLU -> Linear``.

    FlexDiT's timestep part: built with ``hidden_size``; ``forward(t [B]) -> [B, D]`` for
    the float32 model time. :meth:`init_weights`: both linear weights ``N(0, 0.02)`` (DiT).
    """

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def init_weights(self):
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t):
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


@MODELS.register_module()
class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, index ``num_classes``, for "no class"
    (classifier-free guidance). Dropping labels is the generator's job (seeded there).

    FlexDiT's label part: built with ``num_classes`` and ``hidden_size``;
    ``forward(labels [B]) -> [B, D]`` with label ``num_classes`` meaning "no class".
    :meth:`init_weights`: the table ``N(0, 0.02)`` (DiT).
    """

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def init_weights(self):
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels):
        return self.embedding_table(labels)
