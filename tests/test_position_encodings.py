import numpy as np
import torch

from flexgen.position_encodings import AxialRoPE2D, SinCos2D, apply_rotary
from flexgen.structures import grid_positions


def test_rope_scores_depend_only_on_relative_position():
    rope = AxialRoPE2D(head_dim=16)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 16, generator=g), torch.randn(1, 1, 16, generator=g)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([pq]))
        ck, sk = rope(torch.tensor([pk]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    base = score((2, 5), (7, 1))
    assert abs(score((12, 9), (17, 5)) - base) < 1e-4       # shift both by (10, 4)
    assert abs(score((2, 5), (7, 2)) - base) > 1e-3         # a different offset differs
    # rotation preserves norms, and position (0, 0) is the identity
    c, s = rope(torch.tensor([[3, 11]]))
    torch.testing.assert_close(apply_rotary(q, c, s).norm(), q.norm())
    c0, s0 = rope(torch.tensor([[0, 0]]))
    torch.testing.assert_close(apply_rotary(q, c0, s0), q)


def test_rope_layout_rows_first_half_interleaved_pairs():
    rope = AxialRoPE2D(head_dim=8, theta=100.0)
    angles = rope.angles(torch.tensor([[3, 5]]))[0]
    w = [1.0, 100 ** -0.5]
    expected = [3 * w[0], 3 * w[0], 3 * w[1], 3 * w[1], 5 * w[0], 5 * w[0], 5 * w[1], 5 * w[1]]
    torch.testing.assert_close(angles, torch.tensor(expected))


def _mae_table(dim, grid):
    """DiT / MAE's numpy construction of the fixed 2D table, written out independently."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    axis = np.arange(grid, dtype=np.float64)
    first, second = np.meshgrid(axis, axis)  # DiT: np.meshgrid(grid_w, grid_h)
    return np.concatenate([one_d(dim // 2, first), one_d(dim // 2, second)], axis=1)


def test_sincos_equals_dit_table_on_square_grid():
    table = SinCos2D(32)(grid_positions(torch.tensor([[4, 4]])))
    torch.testing.assert_close(table, torch.from_numpy(_mae_table(32, 4)).float())
