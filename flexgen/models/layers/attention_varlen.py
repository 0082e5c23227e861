"""GPU attention backends for packed batches: ``'flash_varlen'`` and ``'xformers'``.

Both run one kernel over the whole pack and never look at pairs of tokens from different
images, as NiT does (Wang et al. 2025, ``flash_attn_varlen_func`` on ``cu_seqlens``).
They are optional extras (``pip install flexgen[gpu]``), imported only when one of them
is built; nothing else in flexgen needs them.

- ``flash_varlen``: FlashAttention-2 (Dao 2023) ``flash_attn_varlen_func(q, k, v,
  cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)`` on ``[N, heads, head_dim]``, with
  ``cu_seqlens`` int32 on the device and ``max_seqlen`` taken from the host-side sizes
  (no device sync per layer). CUDA, fp16 / bf16 only (run under ``torch.autocast``).
- ``xformers``: ``memory_efficient_attention`` with a ``BlockDiagonalMask.from_seqlens``
  bias (cached on the batch, shared by all layers). CUDA.
"""
import torch

from flexgen.registry import ATTENTION_BACKENDS
from .attention_base import AttentionBackend

_EXTRA = 'pip install flexgen[gpu]'
_HALF = (torch.float16, torch.bfloat16)


def _require_cuda(name, q):
    if q.device.type != 'cuda':
        raise ValueError(f"attention backend {name!r} runs on CUDA only, got tensors on "
                         f"{q.device}; use backend='auto' (picks a kernel per device) or "
                         f"'sdpa'")


class _HalfPrecisionCudaKernel(AttentionBackend):
    """A packed kernel that runs on CUDA in float16 / bfloat16 (what ``'auto'`` asks)."""

    @classmethod
    def runs_packed(cls, device, dtype):
        return device.type == 'cuda' and dtype in _HALF


@ATTENTION_BACKENDS.register_module(name='flash_varlen')
class FlashVarlenAttention(_HalfPrecisionCudaKernel):
    """Packed attention with ``flash_attn_varlen_func`` (FlashAttention-2); ``'auto'``'s
    first choice on CUDA in float16 / bfloat16."""

    auto_priority = 0

    def __init__(self):
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError as error:
            raise ImportError(
                f"attention backend 'flash_varlen' needs the flash-attn package, which is "
                f"not installed ({error}). Install the GPU extra: {_EXTRA} (or pip install "
                f"flash-attn), or use backend='auto' / 'sdpa'.") from error
        self._varlen = flash_attn_varlen_func

    def __call__(self, q, k, v, batch):
        _require_cuda('flash_varlen', q)
        if q.dtype not in _HALF:
            raise TypeError(f"attention backend 'flash_varlen' computes in float16 / bfloat16 "
                            f"only, got {q.dtype}: run the model under torch.autocast(dtype="
                            f"torch.bfloat16) as NiT does, or use backend='auto', which "
                            f"takes 'sdpa' for float32")
        cu = batch.cu_seqlens.to(device=q.device, dtype=torch.int32)
        m = batch.max_seqlen
        return self._varlen(q, k, v, cu, cu, m, m, dropout_p=0.0, causal=False)


def block_diagonal_mask(batch):
    """xformers' ``BlockDiagonalMask`` of ``batch`` (one block per image), cached on it."""
    from xformers.ops import fmha
    cache = batch.geometry.plans
    key = ('xformers_block_diagonal', str(batch.device))
    if key not in cache:
        make = fmha.attn_bias.BlockDiagonalMask.from_seqlens
        try:
            cache[key] = make(batch.seqlens_list, device=batch.device)
        except TypeError:  # xformers before the device argument moves it lazily
            cache[key] = make(batch.seqlens_list)
    return cache[key]


@ATTENTION_BACKENDS.register_module(name='xformers')
class XFormersAttention(_HalfPrecisionCudaKernel):
    """Packed attention with xformers' ``memory_efficient_attention`` and a
    block-diagonal bias; ``'auto'``'s second choice on CUDA in float16 / bfloat16."""

    auto_priority = 1

    def __init__(self):
        try:
            from xformers.ops import memory_efficient_attention
        except ImportError as error:
            raise ImportError(
                f"attention backend 'xformers' needs the xformers package, which is not "
                f"installed ({error}). Install the GPU extra: {_EXTRA} (or pip install "
                f"xformers), or use backend='auto' / 'sdpa'.") from error
        self._attention = memory_efficient_attention

    def __call__(self, q, k, v, batch):
        _require_cuda('xformers', q)
        # xformers wants [batch, tokens, heads, head_dim]: the pack is one sequence
        out = self._attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                              attn_bias=block_diagonal_mask(batch))
        return out.squeeze(0)
