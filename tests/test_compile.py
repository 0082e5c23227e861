"""Regional compilation of the blocks (FlexDiT(compile_blocks=True)): packs of other
lengths and image counts reuse the compiled blocks (no recompilation, the attention
kernel call the only graph break) and the outputs and gradients equal eager mode."""
import pytest
import torch

from flexgen.registry import MODELS
from flexgen.structures import patchify

NIT_TINY = dict(type='FlexDiT', in_channels=3, patch_size=2, hidden_size=32, depth=3,
                num_heads=2, num_classes=6, pos_embed=None, time_scale=1.0,
                qk_norm=dict(type='layernorm_affine', eps=1e-5),
                rope=dict(type='AxialRoPE2D', layout='nit'), attn_backend='sdpa')


def pack(step):
    g = torch.Generator().manual_seed(step)
    n = 3 + step
    sizes = [(2 * (2 + (3 * i + step) % 5), 2 * (2 + (5 * i + step) % 4)) for i in range(n)]
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    return (patchify(images, 2), torch.rand(n, generator=g),
            torch.randint(0, 6, (n,), generator=g))


@pytest.mark.slow
def test_compiled_blocks_compile_once_for_packs_of_any_length():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = MODELS.build(NIT_TINY)
    compiled = MODELS.build(dict(NIT_TINY, compile_blocks=True))
    compiled.load_state_dict(eager.state_dict())
    with torch.no_grad():  # the zero-initialised adaLN / output layers would hide the blocks
        g = torch.Generator().manual_seed(1)
        for a, b in zip(eager.parameters(), compiled.parameters()):
            a.add_(0.05 * torch.randn(a.shape, generator=g))
            b.copy_(a)
    frames = []
    for step in range(5):
        batch, t, y = pack(step)
        outs = [model(batch, t, y) for model in (eager, compiled)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        grads = [torch.autograd.grad(out.pow(2).sum(), model.blocks[1].attn.qkv.weight)[0]
                 for out, model in zip(outs, (eager, compiled))]
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
        frames.append(counters['frames']['total'])
    assert len({tuple(pack(s)[0].seqlens_list) for s in range(5)}) == 5  # five layouts
    assert frames[0] > 0 and frames[-1] == frames[0], frames  # compiled with the first pack only
    breaks = [reason for reason in counters['graph_break'] if 'attend' not in reason]
    assert not breaks, breaks
