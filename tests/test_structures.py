import pytest
import torch

from flexgen.structures import TokenBatch, grid_positions, patchify, unpatchify


def _images(sizes, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, h, w, generator=g) for h, w in sizes]


def test_patchify_round_trip_mixed_sizes():
    images = _images([(8, 8), (4, 12), (16, 6), (2, 2)])
    batch = patchify(images, 2)
    assert batch.sizes.tolist() == [[4, 4], [2, 6], [8, 3], [1, 1]]
    assert batch.tokens.shape == (16 + 12 + 24 + 1, 3 * 4)
    for a, b in zip(images, unpatchify(batch.tokens, batch.sizes, 2)):
        assert torch.equal(a, b)


def test_patch_layout_is_c_p1_p2_row_major():
    image = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    batch = patchify([image], 2)
    # token 1 is the patch at row 0, col 1: pixels rows 0-1, cols 2-3 of both channels
    expected = torch.stack([image[c, p1, 2 + p2] for c in range(2) for p1 in range(2)
                            for p2 in range(2)])
    assert torch.equal(batch.tokens[1], expected)
    assert batch.positions[1].tolist() == [0, 1]
    assert batch.positions[3].tolist() == [1, 0]


def test_geometry():
    batch = TokenBatch(torch.zeros(4 + 6, 1), torch.tensor([[2, 2], [2, 3]]))
    assert batch.cu_seqlens.tolist() == [0, 4, 10]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.image_ids.tolist() == [0] * 4 + [1] * 6
    assert grid_positions(batch.sizes).tolist() == [
        [0, 0], [0, 1], [1, 0], [1, 1], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert not batch.is_uniform
    per_image = torch.tensor([[1.0], [2.0]])
    assert batch.per_token(per_image).squeeze(1).tolist() == [1.0] * 4 + [2.0] * 6
    uniform = TokenBatch(torch.zeros(8, 1), torch.tensor([[2, 2], [1, 4]]))
    assert uniform.is_uniform
    assert uniform.per_token(per_image).squeeze(1).tolist() == [1.0] * 4 + [2.0] * 4
    doubled = batch.repeat(2)
    assert doubled.sizes.tolist() == [[2, 2], [2, 3]] * 2


def test_bad_input_errors():
    with pytest.raises(ValueError, match='not divisible by the patch size 2'):
        patchify([torch.zeros(3, 5, 4)], 2)
    with pytest.raises(ValueError, match='describe 4 tokens'):
        TokenBatch(torch.zeros(5, 1), torch.tensor([[2, 2]]))
