"""Forward FLOPs: every DiT size against the DiT paper's Table 4, and the CPU flash-attention
formula flexgen.utils.flops registers against torch's own matmul formulas."""
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import flexgen
from flexgen.registry import MODELS
from flexgen.structures import TokenBatch
from flexgen.utils import forward_flops

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
flexgen.register_all_modules()

# DiT (Peebles & Xie 2023) Table 4: forward Gflops (multiply-adds) at 256 x 256, i.e. a
# 32 x 32 x 4 latent.
DIT_TABLE_4_GFLOPS = {
    ('s', 8): 0.36, ('s', 4): 1.41, ('s', 2): 6.06,
    ('b', 8): 1.42, ('b', 4): 5.56, ('b', 2): 23.01,
    ('l', 8): 5.01, ('l', 4): 19.70, ('l', 2): 80.71,
    ('xl', 8): 7.39, ('xl', 4): 29.05, ('xl', 2): 118.64,
}


@pytest.mark.parametrize('size, patch', sorted(DIT_TABLE_4_GFLOPS), ids=lambda v: str(v))
def test_dit_forward_flops_match_table_4(size, patch):
    """The real config's backbone on one 32 x 32 latent, within 1% of Table 4. Weights and
    activations are fake tensors (shapes only: XL/2 costs no memory and no arithmetic),
    while the batch geometry stays real; attention runs the CPU flash kernel, so its
    count comes from the registered formula."""
    backbone = dict(Config.fromfile(
        osp.join(ROOT, 'configs', 'dit', f'dit_{size}_{patch}_256.py')).model.backbone)
    grid = 32 // patch
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = MODELS.build(backbone)
        tokens = torch.empty(grid * grid, 4 * patch * patch)
        t, y = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    gflops = forward_flops(model, TokenBatch(tokens, [[grid, grid]]), t, y) / 2e9
    assert gflops == pytest.approx(DIT_TABLE_4_GFLOPS[size, patch], rel=0.01)


def explicit_attention(q, k, v):
    """Softmax attention written out, which torch counts as two batched matmuls."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return scores.softmax(-1) @ v


def test_cpu_flash_attention_formula_equals_the_matmul_count():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=gen, requires_grad=True) for _ in range(3))
    counts = []
    for attention in (F.scaled_dot_product_attention, explicit_attention):
        with FlopCounterMode(display=False) as counter:
            out = attention(q, k, v)
        forward = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.sum().backward()
        counts.append((forward, counter.get_total_flops()))
        assert forward_flops(attention, q, k, v) == forward
    (flash_fwd, flash_bwd), (math_fwd, math_bwd) = counts
    assert flash_fwd == math_fwd == 2 * 2 * (2 * 3 * 40 * 40 * 16)
    # The math path's backward has 4 matmuls; the flash backward recomputes the scores (a 5th)
    assert flash_bwd == math_bwd * 5 // 4
