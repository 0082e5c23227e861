"""Every attention backend equals per-image dense attention on packed batches."""
import importlib.util
import warnings

import pytest
import torch

import flexgen.models.layers.attention_backends as backends
from flexgen.models.layers.attention_backends import AutoAttention, build_attention_backend
from flexgen.models.layers.attention_base import AttentionBackend
from flexgen.models.layers.attention_flex import (FlexAttention, document_block_mask,
                                                  flex_attention_available)
from flexgen.registry import ATTENTION_BACKENDS
from flexgen.structures import TokenBatch
from helpers import per_image_attention

HAS_CUDA = torch.cuda.is_available()
HAS_FLASH = importlib.util.find_spec('flash_attn') is not None
HAS_XFORMERS = importlib.util.find_spec('xformers') is not None
HAS_TORCH_VARLEN = (importlib.util.find_spec('torch.nn.attention.varlen') is not None
                    and torch.backends.cuda.is_flash_attention_available())
needs_flex = pytest.mark.skipif(not flex_attention_available(),
                                reason='torch.nn.attention.flex_attention is not available')

PACKS = {
    'single_square': [[4, 4]],
    'single_non_square': [[3, 5]],
    'equal_lengths': [[3, 4], [4, 3], [2, 6], [6, 2]],             # uniform: dense path
    'mixed': [[2, 3], [4, 4], [1, 1], [3, 2], [4, 4], [1, 5]],     # groups interleaved
    'mixed_sorted': [[2, 2], [1, 4], [3, 3], [1, 9], [5, 1]],      # groups already contiguous
}


def _pack(sizes, heads=2, head_dim=8, dtype=torch.float64, seed=0, requires_grad=True):
    sizes = torch.tensor(sizes)
    n = int(sizes.prod(1).sum())
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, heads, head_dim, generator=g, dtype=dtype,
                           requires_grad=requires_grad) for _ in range(3))
    weight = torch.randn(n, heads, head_dim, generator=g, dtype=dtype)
    return TokenBatch(torch.zeros(n, 1), sizes), q, k, v, weight


def _assert_matches_per_image(backend, sizes, check_grads=True, tol=1e-10):
    batch, q, k, v, weight = _pack(sizes, requires_grad=check_grads)
    out = backend(q, k, v, batch)
    ref = per_image_attention(q, k, v, batch)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    if check_grads:
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
        for name, a, b in zip('qkv', grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10,
                                       msg=lambda m: f'grad of {name}: {m}')


@pytest.mark.parametrize('name', ['sdpa', 'per_image', 'padded', 'auto'])
@pytest.mark.parametrize('pack', list(PACKS))
def test_cpu_backend_equals_per_image_attention(name, pack):
    _assert_matches_per_image(build_attention_backend(name), PACKS[pack])


@pytest.mark.parametrize('strategy', ['runs', 'grouped'])
@pytest.mark.parametrize('pack', list(PACKS))
def test_sdpa_strategies_equal_per_image_attention(strategy, pack):
    _assert_matches_per_image(build_attention_backend(dict(type='sdpa', strategy=strategy)),
                              PACKS[pack])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_sdpa_runs_on_strided_inputs_equals_per_image_attention(dtype):
    # q, k, v as Attention makes them: views of one qkv projection [N, 3, H, d]
    batch = _pack(PACKS['mixed'])[0]
    n = batch.tokens.shape[0]
    qkv = torch.randn(n, 3, 2, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    qkv.requires_grad_()
    q, k, v = qkv.unbind(1)
    out = build_attention_backend(dict(type='sdpa', strategy='runs'))(q, k, v, batch)
    ref = build_attention_backend('per_image')(q, k, v, batch)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grad, = torch.autograd.grad((out * weight).sum(), qkv)
    ref_grad, = torch.autograd.grad((ref * weight).sum(), qkv)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)


def test_equal_length_runs_merge_consecutive_images_only():
    runs = _pack([[2, 3], [3, 2], [1, 1], [6, 1], [2, 2]])[0].geometry.runs()
    assert runs == [(0, 2, 6), (12, 1, 1), (13, 1, 6), (19, 1, 4)]
    assert _pack(PACKS['equal_lengths'])[0].geometry.runs() == [(0, 4, 12)]


def test_sdpa_rejects_an_unknown_strategy():
    with pytest.raises(ValueError, match="strategy must be 'auto', 'runs' or 'grouped'"):
        backends.SDPAAttention(strategy='fast')


@needs_flex
@pytest.mark.parametrize('block_size', [4, 8, 128])  # small tiles straddle image borders
@pytest.mark.parametrize('pack', list(PACKS))
def test_flex_forward_equals_per_image_attention(block_size, pack):
    # eager flex on CPU (compiling takes tens of seconds; the compiled kernel is tested
    # in the slow test below); CPU flex has no backward, so no gradients here
    _assert_matches_per_image(FlexAttention(block_size, compile=False), PACKS[pack],
                              check_grads=False)


@needs_flex
def test_flex_with_gradients_on_cpu_falls_back_to_sdpa_with_a_warning():
    import flexgen.models.layers.attention_flex as flex
    flex._WARNED.discard('backward')
    with pytest.warns(UserWarning, match="no CPU backward.*grouped 'sdpa'"):
        _assert_matches_per_image(FlexAttention(8, compile=False), PACKS['mixed'])


@needs_flex
def test_flex_without_grad_mode_detaches_instead_of_refusing():
    batch, q, k, v, _ = _pack(PACKS['mixed'])  # inputs require grad, grad mode off
    with torch.no_grad():
        out = FlexAttention(8, compile=False)(q, k, v, batch)
    torch.testing.assert_close(out, per_image_attention(q, k, v, batch).detach(), rtol=1e-10,
                               atol=1e-10)


@needs_flex
@pytest.mark.parametrize('block_size', [4, 8, 128])
@pytest.mark.parametrize('pack', ['single_non_square', 'equal_lengths', 'mixed'])
def test_document_block_mask_equals_create_block_mask(block_size, pack):
    from torch.nn.attention.flex_attention import create_block_mask
    batch = _pack(PACKS[pack])[0]
    ids, n = batch.image_ids, batch.tokens.shape[0]
    ours = document_block_mask(batch, block_size)
    theirs = create_block_mask(lambda b, h, i, j: ids[i] == ids[j], None, None, n, n,
                               device='cpu', BLOCK_SIZE=block_size)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    assert document_block_mask(batch, block_size) is ours  # cached on the batch


@needs_flex
@pytest.mark.slow
def test_compiled_flex_equals_per_image_attention():
    batch, q, k, v, _ = _pack(PACKS['mixed'], heads=2, head_dim=16, dtype=torch.float32,
                              requires_grad=False)
    out = FlexAttention(compile=True)(q, k, v, batch)
    torch.testing.assert_close(out, per_image_attention(q, k, v, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('strategy, shapes', [
    # lengths 6, 16, 1, 6, 16, 5: groups (6: 2 images), (16: 2), (1: 1), (5: 1)
    ('grouped', [(2, 2, 6, 8), (2, 2, 16, 8), (1, 2, 1, 8), (1, 2, 5, 8)]),
    ('runs', [(1, 2, 6, 8), (1, 2, 16, 8), (1, 2, 1, 8), (1, 2, 6, 8), (1, 2, 16, 8),
              (1, 2, 5, 8)])])
def test_sdpa_portable_path_calls_one_dense_sdpa_per_segment(monkeypatch, strategy, shapes):
    # the path GPUs take (scaled_dot_product_attention with autograd), forced on CPU
    calls = []
    real = backends.F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append(tuple(q.shape))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(backends, '_cpu_flash_kernels', lambda: None)
    monkeypatch.setattr(backends.F, 'scaled_dot_product_attention', recording)
    backend = backends.SDPAAttention(strategy=strategy)
    for pack in PACKS.values():
        _assert_matches_per_image(backend, pack)
    calls.clear()
    batch, q, k, v, _ = _pack(PACKS['mixed'], heads=2, head_dim=8)
    backend(q, k, v, batch)
    assert calls == shapes


def test_cpu_kernels_run_once_per_segment(monkeypatch):
    forward_kernel, backward_kernel = backends._cpu_flash_kernels()
    shapes = {'forward': [], 'backward': []}

    def recording(name, kernel):
        def call(*args):
            shapes[name].append(tuple(args[0].shape))
            return kernel(*args)
        return call

    monkeypatch.setattr(backends, '_cpu_flash_kernels', lambda: (
        recording('forward', forward_kernel), recording('backward', backward_kernel)))
    batch, q, k, v, weight = _pack([[2, 3], [3, 2], [1, 1], [6, 1], [2, 2]])
    out = backends.SDPAAttention(strategy='runs')(q, k, v, batch)
    torch.autograd.grad((out * weight).sum(), (q, k, v))
    expected = [(2, 2, 6, 8), (1, 2, 1, 8), (1, 2, 6, 8), (1, 2, 4, 8)]
    assert shapes == {'forward': expected, 'backward': expected}


def test_length_groups_order_gathers_each_group_contiguously():
    batch = _pack(PACKS['mixed'])[0]
    groups = batch.geometry.length_groups()
    assert groups.lengths == [6, 16, 1, 5] and groups.counts == [2, 2, 1, 1]
    ids = batch.image_ids[groups.order]
    assert ids.tolist() == [0] * 6 + [3] * 6 + [1] * 16 + [4] * 16 + [2] + [5] * 5
    assert sorted(groups.order.tolist()) == list(range(len(ids)))
    assert batch.replace(batch.tokens * 2).geometry.length_groups() is groups  # shared
    sorted_groups = _pack(PACKS['mixed_sorted'])[0].geometry.length_groups()
    assert sorted_groups.order is None


def test_auto_choices_by_device_dtype_and_batch():
    assert AutoAttention.choose('cpu', torch.float32) == 'sdpa'
    assert AutoAttention.choose('cpu', torch.bfloat16) == 'sdpa'
    flex = 'flex' if flex_attention_available() else 'sdpa'
    assert AutoAttention.choose('cuda', torch.float32) == flex
    expected = ('flash_varlen' if HAS_FLASH else 'torch_varlen' if HAS_TORCH_VARLEN
                else 'xformers' if HAS_XFORMERS else flex)
    assert AutoAttention.choose('cuda', torch.bfloat16) == expected
    # equal lengths (DiT): one dense batched call, whatever is installed
    assert AutoAttention.choose('cuda', torch.bfloat16, uniform=True) == 'sdpa'


def test_auto_candidates_come_from_the_registry():
    cuda = torch.device('cuda')
    packed = ['flash_varlen', 'torch_varlen', 'xformers', 'flex']
    assert AutoAttention.candidates(cuda, torch.bfloat16) == packed
    assert AutoAttention.candidates(cuda, torch.float16) == packed
    assert AutoAttention.candidates(cuda, torch.float32) == ['flex']
    assert AutoAttention.candidates(torch.device('cpu'), torch.bfloat16) == []


@pytest.mark.parametrize('capability, expected', [
    ((7, 5), ['xformers', 'flex']),  # Turing: no FlashAttention-2
    ((8, 0), ['flash_varlen', 'torch_varlen', 'xformers', 'flex']),
    ((9, 0), ['flash_varlen', 'torch_varlen', 'xformers', 'flex'])])
def test_auto_asks_the_gpu_for_flash_attention_s_compute_capability(monkeypatch, capability,
                                                                   expected):
    import flexgen.models.layers.attention_varlen as varlen
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    asked = []
    monkeypatch.setattr(varlen, '_capability', lambda index: asked.append(index) or capability)
    assert AutoAttention.candidates(torch.device('cuda'), torch.float16) == expected
    assert AutoAttention.candidates(torch.device('cuda', 1), torch.bfloat16) == expected
    assert set(asked) == {0, 1}


class _ContractPackedAttention(AttentionBackend):
    """A backend written from the contract: per-image attention, declared a packed kernel
    for float64 on CPU and preferred to every other."""

    auto_priority = -1
    calls = 0

    @classmethod
    def runs_packed(cls, device, dtype):
        return device.type == 'cpu' and dtype == torch.float64

    def __call__(self, q, k, v, batch):
        type(self).calls += 1
        return per_image_attention(q, k, v, batch)


def test_auto_takes_a_new_backend_that_declares_itself(monkeypatch):
    monkeypatch.setitem(ATTENTION_BACKENDS._module_dict, '_contract_packed',
                        _ContractPackedAttention)
    assert AutoAttention.choose('cpu', torch.float64) == '_contract_packed'
    assert AutoAttention.choose('cpu', torch.float32) == 'sdpa'
    assert AutoAttention.choose('cpu', torch.float64, uniform=True) == 'sdpa'
    assert AutoAttention.candidates(torch.device('cuda'), torch.float32) == ['flex']
    batch, q, k, v, _ = _pack(PACKS['mixed'], requires_grad=False)
    out = build_attention_backend('auto')(q, k, v, batch)
    assert _ContractPackedAttention.calls == 1
    torch.testing.assert_close(out, per_image_attention(q, k, v, batch))


def test_registered_names_build():
    assert isinstance(build_attention_backend('flex'), FlexAttention)
    assert isinstance(build_attention_backend(dict(type='auto')), AutoAttention)


@pytest.mark.skipif(HAS_FLASH, reason='flash-attn is installed')
def test_flash_without_the_package_names_the_extra():
    with pytest.raises(ImportError, match=r"'flash_varlen'.*pip install flexgen\[gpu\]"):
        build_attention_backend('flash_varlen')


@pytest.mark.skipif(HAS_XFORMERS, reason='xformers is installed')
def test_xformers_without_the_package_names_the_extra():
    with pytest.raises(ImportError, match=r"'xformers'.*pip install flexgen\[gpu\]"):
        build_attention_backend('xformers')


def _gpu_matches_per_image(name, dtype):
    for pack in PACKS.values():
        batch, q, k, v, weight = _pack(pack, heads=2, head_dim=64, dtype=torch.float32)
        batch = TokenBatch(batch.tokens.cuda(), batch.sizes)
        qc, kc, vc = (x.detach().cuda().to(dtype).requires_grad_() for x in (q, k, v))
        out = build_attention_backend(name)(qc, kc, vc, batch)
        ref = per_image_attention(q, k, v, TokenBatch(q.detach(), batch.sizes))
        torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=2e-2)
        grads = torch.autograd.grad((out.float() * weight.cuda()).sum(), (qc, kc, vc))
        ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.float().cpu(), b, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not (HAS_CUDA and HAS_FLASH), reason='needs CUDA and flash-attn')
def test_flash_varlen_equals_per_image_attention():
    _gpu_matches_per_image('flash_varlen', torch.bfloat16)


@pytest.mark.skipif(not (HAS_CUDA and HAS_TORCH_VARLEN), reason='needs CUDA (torch >= 2.10)')
def test_torch_varlen_equals_per_image_attention():
    _gpu_matches_per_image('torch_varlen', torch.bfloat16)


@pytest.mark.skipif(not (HAS_CUDA and HAS_XFORMERS), reason='needs CUDA and xformers')
def test_xformers_equals_per_image_attention():
    _gpu_matches_per_image('xformers', torch.float16)


@pytest.mark.skipif(not HAS_CUDA, reason='needs CUDA')
@needs_flex
def test_flex_on_cuda_equals_per_image_attention():
    _gpu_matches_per_image('flex', torch.float32)


@needs_flex
def test_flex_warnings_do_not_leak_for_eager_use():
    batch, q, k, v, _ = _pack(PACKS['mixed'], requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        FlexAttention(8, compile=False)(q, k, v, batch)


@pytest.mark.parametrize('backend', ['sdpa', 'auto', dict(type='flex', compile=False)])
def test_attention_layer_with_backend_equals_per_image(backend):
    # the real layer: q, k, v are views of one qkv projection, then QK-norm
    from flexgen.models.layers import Attention
    batch, *_ = _pack(PACKS['mixed'])
    x = torch.randn(batch.tokens.shape[0], 16, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    layers = [Attention(16, 2, qk_norm='layernorm', backend=b).double()
              for b in (backend, 'per_image')]
    layers[0].load_state_dict(layers[1].state_dict())
    with torch.no_grad():  # flex on CPU computes with flex_attention only without grad
        outs = [layer(x, batch) for layer in layers]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # flex on CPU: no backward, falls back (tested above)
        grads = [torch.autograd.grad(layer(x, batch).pow(2).sum(), layer.qkv.weight)[0]
                 for layer in layers]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)


# Stand-ins of the two GPU libraries' documented calls, written from their API docs, so the
# way the backends hand a pack over (layouts, cu_seqlens dtype, max lengths, block sizes) is
# checked on CPU; only the CUDA kernels themselves stay untested without a GPU.
def _segment_attention(q, k, v, starts, scale):
    out = torch.empty_like(q)
    for a, b in zip(starts[:-1], starts[1:]):
        logits = torch.einsum('nhd,mhd->hnm', q[a:b].float(), k[a:b].float()) * scale
        out[a:b] = torch.einsum('hnm,mhd->nhd', logits.softmax(-1), v[a:b].float()).to(q.dtype)
    return out


def _fake_flash_attn():
    import types
    module = types.ModuleType('flash_attn')

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False):
        # flash-attn's contract: q/k/v [total, heads, head_dim] fp16/bf16, cu_seqlens int32
        # [batch + 1] from 0, max_seqlen the longest sequence, scale 1/sqrt(head_dim) default
        assert q.dim() == 3 and q.dtype in (torch.float16, torch.bfloat16)
        assert k.dtype == v.dtype == q.dtype, (q.dtype, k.dtype, v.dtype)  # one dtype
        assert all(x.stride(-1) == 1 for x in (q, k, v))  # contiguous head_dim
        assert cu_seqlens_q.device == q.device and isinstance(max_seqlen_q, int)
        assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        lengths = cu_seqlens_q.diff()
        assert cu_seqlens_q[0] == 0 and cu_seqlens_q[-1] == q.shape[0]
        assert max_seqlen_q == max_seqlen_k == int(lengths.max())
        assert dropout_p == 0.0 and not causal
        scale = softmax_scale or q.shape[-1] ** -0.5
        return _segment_attention(q, k, v, cu_seqlens_q.tolist(), scale)

    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def _fake_torch_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
                            return_aux=None, scale=None, window_size=(-1, -1)):
    # torch.nn.attention.varlen.varlen_attn's contract: [total, heads, head_dim] fp16 / bf16
    # (flexgen hands it packed rows), cu_seq int32 [batch + 1] on the device, max_q / max_k
    # Python ints (the kernel's launch grid), full (non-causal) window by default
    assert query.dim() == 3 and query.dtype in (torch.float16, torch.bfloat16)
    assert key.dtype == value.dtype == query.dtype, (query.dtype, key.dtype, value.dtype)
    assert all(x.is_contiguous() for x in (query, key, value))
    assert cu_seq_q.device == query.device and cu_seq_q.dtype == torch.int32
    assert torch.equal(cu_seq_q, cu_seq_k) and isinstance(max_q, int) and max_q == max_k
    lengths = cu_seq_q.diff()
    assert cu_seq_q[0] == 0 and cu_seq_q[-1] == query.shape[0] and max_q == int(lengths.max())
    assert return_aux is None and tuple(window_size) == (-1, -1)
    return _segment_attention(query, key, value, cu_seq_q.tolist(),
                              scale or query.shape[-1] ** -0.5)


def _fake_xformers():
    import types
    xformers, ops = types.ModuleType('xformers'), types.ModuleType('xformers.ops')
    fmha, attn_bias = types.ModuleType('xformers.ops.fmha'), types.ModuleType('attn_bias')

    class BlockDiagonalMask:
        def __init__(self, seqlens):
            self.seqlens = list(seqlens)

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None, device=None):
            assert all(isinstance(n, int) for n in q_seqlen) and kv_seqlen in (None, q_seqlen)
            return cls(q_seqlen)

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        # xformers' contract: [batch, tokens, heads, head_dim]; a BlockDiagonalMask needs
        # batch 1 and splits the tokens into its blocks
        assert query.dim() == 4 and query.shape[0] == 1
        assert sum(attn_bias.seqlens) == query.shape[1]
        starts = torch.tensor([0] + attn_bias.seqlens).cumsum(0).tolist()
        out = _segment_attention(query[0], key[0], value[0], starts,
                                 scale or query.shape[-1] ** -0.5)
        return out.unsqueeze(0)

    attn_bias.BlockDiagonalMask = BlockDiagonalMask
    fmha.attn_bias = attn_bias
    ops.fmha, ops.memory_efficient_attention = fmha, memory_efficient_attention
    xformers.ops = ops
    return {'xformers': xformers, 'xformers.ops': ops, 'xformers.ops.fmha': fmha}


@pytest.mark.parametrize('name', ['flash_varlen', 'torch_varlen', 'xformers'])
def test_gpu_backends_hand_packs_over_as_the_libraries_document(name, monkeypatch):
    import sys

    import torch.nn.attention.varlen as torch_varlen

    import flexgen.models.layers.attention_varlen as varlen
    fakes = ({'flash_attn': _fake_flash_attn()} if name == 'flash_varlen'
             else {} if name == 'torch_varlen' else _fake_xformers())
    for module_name, module in fakes.items():
        monkeypatch.setitem(sys.modules, module_name, module)
    monkeypatch.setattr(torch_varlen, 'varlen_attn', _fake_torch_varlen_attn)
    monkeypatch.setattr(torch.backends.cuda, 'is_flash_attention_available', lambda: True)
    monkeypatch.setattr(varlen, '_require_cuda', lambda *args: None)  # CPU stand-ins
    backend = build_attention_backend(name)
    for sizes in PACKS.values():
        batch, q, k, v, _ = _pack(sizes, dtype=torch.float32, requires_grad=False)
        half = [x.to(torch.bfloat16) for x in (q, k, v)]
        out = backend(*half, batch)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        ref = per_image_attention(*(x.float() for x in half), batch)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('kernel', ['flash_varlen', 'torch_varlen'])
def test_auto_takes_a_varlen_kernel_under_autocast_with_a_float32_qk_norm(monkeypatch, kernel):
    """CUDA autocast runs LayerNorm in float32, so QK-norm + RoPE return float32 q, k
    while v comes out of the projection in bf16. Emulated on CPU (bf16 autocast for the
    projection, the norms' outputs cast to float32 as CUDA autocast does, the CPU counted
    as a device with the varlen kernels, the kernels' documented calls as stand-ins): the
    layer hands the kernel one dtype and 'auto' picks flash_varlen, or torch_varlen where
    flash-attn is not installed."""
    import sys

    import torch.nn.attention.varlen as torch_varlen

    import flexgen.models.layers.attention_varlen as varlen
    from flexgen.models.layers.attention import Attention
    from flexgen.position_encodings.rope import AxialRoPE2D
    monkeypatch.setitem(sys.modules, 'flash_attn',
                        _fake_flash_attn() if kernel == 'flash_varlen' else None)
    monkeypatch.setattr(torch_varlen, 'varlen_attn', _fake_torch_varlen_attn)
    monkeypatch.setattr(torch.backends.cuda, 'is_flash_attention_available', lambda: True)
    monkeypatch.setattr(varlen, '_require_cuda', lambda *args: None)
    for cls in (varlen.FlashVarlenAttention, varlen.TorchVarlenAttention):
        monkeypatch.setattr(cls, 'runs_packed',
                            classmethod(lambda cls, device, dtype: dtype == torch.bfloat16))
    torch.manual_seed(0)
    layer = Attention(32, 2, qk_norm='layernorm_affine', backend='auto')
    for norm in (layer.q_norm, layer.k_norm):
        norm.register_forward_hook(lambda module, args, out: out.float())
    batch = TokenBatch(torch.randn(37, 32), torch.tensor([[3, 4], [5, 5]]))
    rope = AxialRoPE2D(16)(batch)
    seen = []
    real = backends.AutoAttention.__call__

    def spy(self, q, k, v, batch):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(self, q, k, v, batch)

    monkeypatch.setattr(backends.AutoAttention, '__call__', spy)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(batch.tokens, batch, rope)
    assert seen == [(torch.bfloat16,) * 3]
    (chosen,) = layer.backend._chosen.values()
    assert isinstance(chosen, ATTENTION_BACKENDS.get(kernel))
    # the same layer without autocast: float32 attention through sdpa; the gradients reach
    # every parameter (the QK-norms' through the cast to v's dtype) and agree
    weight = torch.randn(out.shape)
    grads = torch.autograd.grad((out.float() * weight).sum(), list(layer.parameters()))
    ref = layer(batch.tokens, batch, rope)
    ref_grads = torch.autograd.grad((ref * weight).sum(), list(layer.parameters()))
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    for (name, _), a, b in zip(layer.named_parameters(), grads, ref_grads):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.1 * b.abs().max().item(),
                                   msg=lambda m: f'{name}: {m}')


def test_packed_cuda_kernels_run_in_half_precision_on_cuda():
    """What 'auto' asks of the varlen kernels (importable without flash-attn or xformers)."""
    from flexgen.models.layers.attention_varlen import (FlashVarlenAttention,
                                                        TorchVarlenAttention, XFormersAttention)
    for cls in (FlashVarlenAttention, TorchVarlenAttention, XFormersAttention):
        assert cls.runs_packed(torch.device('cuda'), torch.bfloat16)
        assert cls.runs_packed(torch.device('cuda', 1), torch.float16)
        assert not cls.runs_packed(torch.device('cuda'), torch.float32)
        assert not cls.runs_packed(torch.device('cpu'), torch.bfloat16)
