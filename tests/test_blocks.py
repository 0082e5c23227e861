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
