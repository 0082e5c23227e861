import pytest
import torch

from flexgen.models.layers import build_attention_backend
from flexgen.structures import TokenBatch
from helpers import per_image_attention


@pytest.mark.parametrize('backend', ['sdpa', 'padded', 'per_image'])
@pytest.mark.parametrize('sizes', [[[3, 3], [3, 3], [1, 9]],           # uniform lengths
                                   [[2, 3], [4, 4], [1, 1], [3, 2]]])  # mixed
def test_backend_equals_per_image_attention(backend, sizes):
    batch_sizes = torch.tensor(sizes)
    n = int(batch_sizes.prod(1).sum())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    batch = TokenBatch(torch.zeros(n, 1), batch_sizes)
    out = build_attention_backend(backend)(q, k, v, batch)
    ref = per_image_attention(q, k, v, batch)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_unknown_backend_names_registry():
    with pytest.raises(KeyError, match="attention backend.*Closest registered names: 'sdpa'"):
        build_attention_backend('sdpaa')
