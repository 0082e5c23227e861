"""2D axial rotary position embedding (RoFormer, Su et al. 2021; FiT / NiT layout).

Each attention head's channels are split in two halves: the first half rotates with the
token's row, the second with its column. Inside a half, channels rotate in interleaved
pairs ``(x0, x1), (x2, x3), ...`` with frequencies ``w_i = theta^(-2i/d)``, ``d`` being the
per-axis width (``head_dim / 2``). The angle between a query at ``(r, c)`` and a key at
``(r', c')`` then depends only on ``(r - r', c - c')``.
"""
import torch
import torch.nn as nn

from flexgen.registry import POSITION_ENCODINGS


def rotate_half(x):
    """Interleaved pairs: ``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack([-x[..., 1], x[..., 0]], dim=-1).flatten(-2)


def apply_rotary(x, cos, sin):
    """Rotate ``x`` ``[N, heads, head_dim]`` by per-token angles ``cos, sin`` ``[N, head_dim]``."""
    dtype = x.dtype
    x = x.float()
    return (x * cos[:, None] + rotate_half(x) * sin[:, None]).to(dtype)


@POSITION_ENCODINGS.register_module()
class AxialRoPE2D(nn.Module):
    """Plain 2D axial RoPE: ``forward(batch) -> (cos, sin)`` ``[N, head_dim]``,
    computed in float32 (bf16 angles lose precision at large positions)."""

    def __init__(self, head_dim, theta=10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f'AxialRoPE2D: head_dim {head_dim} must be divisible by 4 '
                             '(two axes of rotating pairs)')
        self.head_dim, self.theta = head_dim, theta
        axis_dim = head_dim // 2
        freqs = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
        self.register_buffer('freqs', freqs.float(), persistent=False)

    def angles(self, positions):
        """``[N, head_dim]`` angles: ``[row * w (pairs) | col * w (pairs)]``."""
        pos = positions.to(self.freqs.device, torch.float32)
        rows = pos[:, 0:1] * self.freqs
        cols = pos[:, 1:2] * self.freqs
        return torch.cat([rows, cols], dim=1).repeat_interleave(2, dim=1)

    def forward(self, batch):
        """``batch``: a TokenBatch (rules that depend on each image's size read
        ``batch.sizes``) or bare positions ``[N, 2]``."""
        positions = batch if torch.is_tensor(batch) else batch.positions
        angles = self.angles(positions)
        return torch.cos(angles), torch.sin(angles)
