"""Fixed 2D sin-cos absolute position embedding (MAE / DiT), for any patch grid."""
import torch
import torch.nn as nn

from flexgen.registry import POSITION_ENCODINGS


def sincos_1d(dim, pos):
    """``[sin(pos w_k), cos(pos w_k)]``, ``w_k = 10000^(-k/(dim/2))``, in float64 on
    ``pos``'s device."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device)
                            / (dim / 2))
    angles = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


@POSITION_ENCODINGS.register_module()
class SinCos2D(nn.Module):
    """DiT's table (Peebles & Xie 2023, after MAE), evaluated at each token's position:
    the first half of the channels encodes the column, the second half the row. For a
    square ``g x g`` grid this equals DiT's fixed ``pos_embed`` buffer."""

    def __init__(self, dim):
        super().__init__()
        if dim % 4:
            raise ValueError(f'SinCos2D: dim {dim} must be divisible by 4')
        self.dim = dim

    def forward(self, positions):
        # computed where the positions are (no host round trip per step), in float64
        emb = torch.cat([sincos_1d(self.dim // 2, positions[:, 1]),
                         sincos_1d(self.dim // 2, positions[:, 0])], dim=1)
        return emb.float()
