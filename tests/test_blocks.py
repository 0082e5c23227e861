import pytest
import torch
from helpers import randomise

from flexgen.models.blocks import AdaLNZeroBlock
from flexgen.models.layers import AdaLNLoRA, AdaLNZero
from flexgen.structures import TokenBatch


def _per_token_block(block, x, c, batch):
    """The block with its adaLN linear run on every token (NiT's way), no broadcasting."""
    mod = block.adaLN_modulation(c[batch.image_ids])
    sa, ca, ga, sm, cm, gm = mod.chunk(6, dim=-1)
    h = block.norm1(x) * (1 + ca) + sa
    x = x + ga * block.attn(h, batch)
    h = block.norm2(x) * (1 + cm) + sm
    return x + gm * block.mlp(h)


@pytest.mark.parametrize('sizes', [[[2, 3], [3, 2]], [[2, 3], [1, 1], [4, 2]]])
@pytest.mark.parametrize('modulation', [dict(type='AdaLNZero'), dict(type='AdaLNLoRA', rank=4)])
def test_per_image_modulation_equals_per_token(sizes, modulation):
    block = randomise(AdaLNZeroBlock(16, 2, modulation=modulation), std=0.2).double()
    batch_sizes = torch.tensor(sizes)
    n = int(batch_sizes.prod(1).sum())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g, dtype=torch.float64)
    c = torch.randn(len(sizes), 16, generator=g, dtype=torch.float64)
    batch = TokenBatch(x, batch_sizes)
    torch.testing.assert_close(block(x, c, batch), _per_token_block(block, x, c, batch))


def test_adaln_lora_with_full_rank_equals_dense_product():
    lora = randomise(AdaLNLoRA(8, rank=8), std=0.2).double()
    dense = AdaLNZero(8).double()
    down, up = lora[1], lora[2]
    with torch.no_grad():
        dense[1].weight.copy_(up.weight @ down.weight)
        dense[1].bias.copy_(up.weight @ down.bias + up.bias)
    c = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(lora(c), dense(c))


def test_per_image_modulation_values_gradients_and_saved_memory():
    """modulate / gate on a mixed batch equal the plain gathered formula (values and
    gradients, float64) and keep no per-token [N, D] copy of the modulation for backward."""
    from flexgen.models.layers import gate, modulate
    from flexgen.structures import TokenBatch
    g = torch.Generator().manual_seed(0)
    batch = TokenBatch(torch.zeros(5 * 7 + 3 * 4 + 6, 1), [[5, 7], [3, 4], [2, 3]])
    n, d = batch.tokens.shape[0], 16
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    shift, scale, gain = (torch.randn(3, d, generator=g, dtype=torch.float64,
                                      requires_grad=True) for _ in range(3))
    out = gate(modulate(x, shift, scale, batch), gain, batch)
    plain = (x * (1 + scale[batch.image_ids]) + shift[batch.image_ids]) * gain[batch.image_ids]
    torch.testing.assert_close(out, plain)
    weight = torch.randn(n, d, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), (x, shift, scale, gain))
    ref = torch.autograd.grad((plain * weight).sum(), (x, shift, scale, gain))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)

    def saved_bytes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes)

    token_bytes = n * d * 8
    ours = saved_bytes(lambda: modulate(x, shift, scale, batch))
    gathered = saved_bytes(lambda: x * (1 + scale[batch.image_ids]) + shift[batch.image_ids])
    assert ours < token_bytes + 3 * d * 8 + n * 8 + 1   # x, 1 + scale, the image ids
    assert gathered >= 2 * token_bytes                   # x and the gathered scale
