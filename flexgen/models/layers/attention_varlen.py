"""GPU attention backends for packed batches: ``'flash_varlen'``, ``'torch_varlen'`` and
``'xformers'``.

Each runs one kernel over the whole pack and never looks at pairs of tokens from different
images, as NiT does (Wang et al. 2025, ``flash_attn_varlen_func`` on ``cu_seqlens``).
flash-attn and xformers are optional extras (``pip install flexgen[gpu]``), imported only
when their backend is built; nothing else in flexgen needs them.

- ``flash_varlen``: FlashAttention-2 (Dao 2023) ``flash_attn_varlen_func(q, k, v,
  cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)`` on ``[N, heads, head_dim]``, with
  ``cu_seqlens`` int32 on the device and ``max_seqlen`` taken from the host-side sizes
  (no device sync per layer). CUDA, fp16 / bf16 only (run under ``torch.autocast``).
- ``torch_varlen``: the same call to the FlashAttention-2 varlen kernel that PyTorch
  (>= 2.10) ships, ``torch.nn.attention.varlen.varlen_attn`` (cuDNN's attention on Hopper
  and Blackwell with cuDNN >= 9.18); no extra package. CUDA, fp16 / bf16 only.
- ``xformers``: ``memory_efficient_attention`` with a ``BlockDiagonalMask.from_seqlens``
  bias (cached on the batch, shared by all layers). CUDA.
"""
import functools

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


def _require_half(name, q):
    if q.dtype not in _HALF:
        raise TypeError(f"attention backend {name!r} computes in float16 / bfloat16 only, "
                        f"got {q.dtype}: run the model under torch.autocast(dtype="
                        f"torch.bfloat16) as NiT does, or use backend='auto', which takes "
                        f"'flex' or 'sdpa' for float32")


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


class _HalfPrecisionCudaKernel(AttentionBackend):
    """A packed kernel that runs on CUDA in float16 / bfloat16 (what ``'auto'`` asks), on
    GPUs of compute capability ``min_capability`` or newer."""

    min_capability = (0, 0)

    @classmethod
    def runs_packed(cls, device, dtype):
        if device.type != 'cuda' or dtype not in _HALF:
            return False
        if not torch.cuda.is_available():  # asked about CUDA in general, not about a GPU
            return True
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _capability(index) >= cls.min_capability


def _varlen_arguments(q, batch):
    """``cu_seqlens`` (int32, on ``q``'s device) and ``max_seqlen`` (a Python int from the
    host-side sizes): what both FlashAttention-2 varlen entry points take."""
    return batch.cu_seqlens.to(device=q.device, dtype=torch.int32), batch.max_seqlen


@ATTENTION_BACKENDS.register_module(name='flash_varlen')
class FlashVarlenAttention(_HalfPrecisionCudaKernel):
    """Packed attention with ``flash_attn_varlen_func`` (FlashAttention-2); ``'auto'``'s
    first choice on CUDA in float16 / bfloat16."""

    auto_priority = 0
    min_capability = (8, 0)  # FlashAttention-2: Ampere and newer

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
        _require_half('flash_varlen', q)
        cu, m = _varlen_arguments(q, batch)
        return self._varlen(q, k, v, cu, cu, m, m, dropout_p=0.0, causal=False)


@ATTENTION_BACKENDS.register_module(name='torch_varlen')
class TorchVarlenAttention(_HalfPrecisionCudaKernel):
    """Packed attention with PyTorch's own FlashAttention-2 varlen kernel
    (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10); ``'auto'``'s choice on CUDA
    in float16 / bfloat16 when flash-attn is not installed."""

    auto_priority = 1
    min_capability = (8, 0)

    def __init__(self):
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError as error:
            raise ImportError(
                f"attention backend 'torch_varlen' needs torch >= 2.10 "
                f"(torch.nn.attention.varlen), this is torch {torch.__version__} ({error}); "
                f"use backend='flash_varlen' with flash-attn, or 'auto'") from error
        if not torch.backends.cuda.is_flash_attention_available():
            raise ImportError(f"attention backend 'torch_varlen' needs a CUDA build of torch "
                              f"with FlashAttention kernels, this is torch "
                              f"{torch.__version__}; use backend='auto'")
        self._varlen = varlen_attn

    def __call__(self, q, k, v, batch):
        _require_cuda('torch_varlen', q)
        _require_half('torch_varlen', q)
        cu, m = _varlen_arguments(q, batch)
        # packed [T, H, D] rows for both of torch's kernels: FlashAttention-2 needs only a
        # unit last stride, cuDNN's ragged layout is not documented for strided rows (v is
        # a view into the qkv projection)
        q, k, v = (x.contiguous() for x in (q, k, v))
        return self._varlen(q, k, v, cu, cu, m, m)


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
    block-diagonal bias; ``'auto'`` takes it on CUDA in float16 / bfloat16 after the
    FlashAttention-2 kernels."""

    auto_priority = 2

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
