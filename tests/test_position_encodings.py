import numpy as np
import torch

from flexgen.position_encodings import AxialRoPE2D, SinCos2D, apply_rotary
from flexgen.structures import TokenBatch, grid_positions


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


# ---------------------------------------------------------------- layouts and index modes
def _batch(sizes):
    sizes = torch.tensor(sizes)
    return TokenBatch(torch.zeros(int(sizes.prod(1).sum()), 1), sizes)


def test_rope_relative_position_property_in_both_layouts():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 24, generator=g), torch.randn(1, 2, 24, generator=g)
    for layout in ('fit', 'nit'):
        rope = AxialRoPE2D(head_dim=24, layout=layout)

        def score(pq, pk):
            rq, rk = rope(torch.tensor([pq])), rope(torch.tensor([pk]))
            return (apply_rotary(q, *rq) * apply_rotary(k, *rk)).sum().item()

        for shift in [(3, 0), (0, 7), (5, 2)]:
            moved = score((1 + shift[0], 4 + shift[1]), (6 + shift[0], 2 + shift[1]))
            assert abs(moved - score((1, 4), (6, 2))) < 1e-4
        assert abs(score((1, 4), (6, 2)) - score((1, 4), (2, 6))) > 1e-3


def test_nit_layout_is_fit_layout_with_halves_swapped():
    positions = grid_positions(torch.tensor([[3, 5]]))
    fit = AxialRoPE2D(16, layout='fit').angles(positions)
    nit = AxialRoPE2D(16, layout='nit').angles(positions)
    torch.testing.assert_close(nit, torch.cat([fit[:, 8:], fit[:, :8]], dim=1), rtol=0, atol=0)
    # the first half of 'nit' rotates with the column
    torch.testing.assert_close(nit[:, 0], positions[:, 1].float(), rtol=0, atol=0)


def test_nit_legacy_index_is_the_documented_quirk():
    legacy = AxialRoPE2D(8, layout='nit', index_mode='nit_legacy')
    rowcol = AxialRoPE2D(8, layout='nit')
    # square: identical to the true positions
    square = _batch([[4, 4]])
    for a, b in zip(legacy(square), rowcol(square)):
        assert torch.equal(a, b)
    # ... which, in NiT's layout, is FiT's layout with the axes swapped
    fit_cos = AxialRoPE2D(8, layout='fit')(square)[0]
    assert torch.equal(legacy(square)[0], torch.cat([fit_cos[:, 4:], fit_cos[:, :4]], 1))
    # h=2, w=3: (pos_a, pos_b) = (k mod h, k div h), pos_a on the first rotary half
    nonsquare = _batch([[2, 3]])
    pos = legacy.positions(nonsquare)
    pos_a, pos_b = pos[:, 1].tolist(), pos[:, 0].tolist()
    assert list(zip(pos_a, pos_b)) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    # the highest frequency of each half is 1, so its angle is the position itself
    angles = torch.atan2(legacy(nonsquare)[1], legacy(nonsquare)[0])
    torch.testing.assert_close(angles[:, 0], torch.tensor(pos_a, dtype=torch.float32))
    torch.testing.assert_close(angles[:, 4], torch.tensor(pos_b, dtype=torch.float32))
    # the true positions differ: (row, col) = (k div w, k mod w)
    assert rowcol.positions(nonsquare).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert not torch.equal(legacy(nonsquare)[0], rowcol(nonsquare)[0])
    # in a mixed batch every image gets its own legacy grid
    mixed = legacy.positions(_batch([[2, 3], [3, 3]]))
    assert torch.equal(mixed[:6], pos) and torch.equal(mixed[6:], rowcol.positions(_batch([[3, 3]])))
