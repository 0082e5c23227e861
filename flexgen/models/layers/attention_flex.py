"""Attention backend ``'flex'``: torch's FlexAttention with a document block mask.

FlexAttention (PyTorch >= 2.5, ``torch.nn.attention.flex_attention``) runs one fused
kernel over the whole packed sequence and skips every ``block_size x block_size`` tile
whose query and key tokens belong to different images, so a pack costs about
``sum n_i^2`` plus the tiles that straddle image borders, never ``(sum n_i)^2``. The
block mask is built directly from ``cu_seqlens`` (``create_block_mask`` would evaluate
the mask on all ``N^2`` pairs) and cached on the :class:`~flexgen.structures.TokenBatch`,
so all layers share it.

Limits of the CPU path, as of PyTorch 2.14 (measured in ``tools/benchmark.py``):

- FlexAttention has no CPU backward: with gradients on CPU this backend computes the
  same attention with the grouped ``'sdpa'`` backend and warns once.
- Eager FlexAttention on CPU materialises the whole ``N x N`` score matrix; only the
  ``torch.compile``-d kernel skips tiles, and compiling it costs tens of seconds. So
  ``compile=True`` is the default; where compilation fails (no C++ compiler, ...) the
  backend warns once and falls back to ``'sdpa'`` rather than to the quadratic eager path.
"""
import warnings

import torch

from flexgen.registry import ATTENTION_BACKENDS
from flexgen.structures import host_to_device
from .attention_backends import SDPAAttention
from .attention_base import AttentionBackend

_COMPILED = {}        # the compiled kernel, one per process (shared by every layer)
_COMPILE_FAILED = set()  # device types where compiling failed: every layer falls back
_WARNED = set()


def flex_attention_available():
    """Whether this torch has ``torch.nn.attention.flex_attention``."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def document_block_mask(batch, block_size=128):
    """The :class:`~torch.nn.attention.flex_attention.BlockMask` of ``batch``'s
    block-diagonal attention (a token sees the tokens of its own image), cached on the
    batch per device and block size."""
    cache = batch.geometry.plans
    key = ('flex_block_mask', str(batch.device), block_size)
    if key not in cache:
        cache[key] = _build_document_block_mask(batch.seqlens_list, block_size, batch.device)
    return cache[key]


def _build_document_block_mask(seqlens, block_size, device):
    from torch.nn.attention.flex_attention import BlockMask
    n = sum(seqlens)
    num_blocks = max(1, -(-n // block_size))
    # Image id of every token; the tail of the last tile gets an id of its own, so the
    # mask function never indexes past the end and padding never matches a real token.
    doc = torch.full((num_blocks * block_size,), len(seqlens), dtype=torch.int32)
    doc[:n] = torch.repeat_interleave(torch.arange(len(seqlens), dtype=torch.int32),
                                      torch.tensor(seqlens, dtype=torch.long), output_size=n)
    first, last = doc[::block_size], doc[block_size - 1::block_size]
    # Image ids are sorted, so tile i spans images first[i]..last[i]; two tiles interact
    # iff those ranges overlap, and a tile pair inside one single image needs no mask.
    touch = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    single = first == last
    full = single[:, None] & single[None, :] & (first[:, None] == first[None, :])
    partial = touch & ~full

    def ordered(blocks):
        counts = blocks.sum(1, dtype=torch.int32)
        indices = torch.argsort((~blocks).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return (host_to_device(counts[None, None], device),
                host_to_device(indices[None, None], device))

    doc = host_to_device(doc, device)

    def same_image(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size,
                                    mask_mod=same_image, seq_lengths=(n, n))


def _compiled_flex_attention():
    if 'fn' not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED['fn'] = torch.compile(flex_attention)
    return _COMPILED['fn']


@ATTENTION_BACKENDS.register_module(name='flex')
class FlexAttention(AttentionBackend):
    """Block-diagonal attention with ``flex_attention`` and a document block mask;
    ``'auto'``'s choice on CUDA after the varlen kernels (and the only one in float32).

    Args:
        block_size: tile size of the block mask (FlexAttention's default 128; smaller
            tiles waste less work on image borders when images are short).
        compile: run the ``torch.compile``-d kernel (the only one that skips tiles).
            ``False`` runs eager FlexAttention, which on CPU materialises the whole
            score matrix: for tests and debugging only.
    """

    auto_priority = 3

    @classmethod
    def runs_packed(cls, device, dtype):
        return device.type == 'cuda'

    def __init__(self, block_size=128, compile=True):
        if not flex_attention_available():
            raise ImportError(
                f"attention backend 'flex' needs torch.nn.attention.flex_attention "
                f'(PyTorch >= 2.5); this is torch {torch.__version__}. Use '
                f"backend='sdpa' or 'auto'.")
        self.block_size, self.compile = block_size, compile
        self._fallback = SDPAAttention()

    @staticmethod
    def _warn_once(key, message):
        if key not in _WARNED:  # once per process, not once per layer
            _WARNED.add(key)
            warnings.warn(message, stacklevel=3)

    def __call__(self, q, k, v, batch):
        on_cpu = q.device.type == 'cpu'
        if on_cpu and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            self._warn_once('backward', (
                f"attention backend 'flex': flex_attention has no CPU backward in torch "
                f"{torch.__version__}; attention that needs gradients on CPU runs with the "
                f"grouped 'sdpa' backend (same result)."))
            return self._fallback(q, k, v, batch)
        if on_cpu:  # no grad needed, but flex refuses inputs that merely require it
            q, k, v = q.detach(), k.detach(), v.detach()
        if self.compile and q.device.type in _COMPILE_FAILED:
            return self._fallback(q, k, v, batch)
        block_mask = document_block_mask(batch, self.block_size)
        qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        if not self.compile:
            from torch.nn.attention.flex_attention import flex_attention
            with warnings.catch_warnings():  # eager is chosen on purpose here
                warnings.filterwarnings('ignore', message='flex_attention called without')
                out = flex_attention(qh, kh, vh, block_mask=block_mask)
            return out[0].transpose(0, 1)
        try:  # a new shape may recompile at any call, and compilation can fail there too
            out = _compiled_flex_attention()(qh, kh, vh, block_mask=block_mask)
        except _compile_errors() as error:
            _COMPILE_FAILED.add(q.device.type)
            self._warn_once(('compile', q.device.type), (
                f"attention backend 'flex': torch.compile(flex_attention) failed on "
                f"{q.device.type} ({type(error).__name__}: {str(error)[:200]}); using the "
                f"grouped 'sdpa' backend from now on (eager flex_attention would cost "
                f"(sum n)^2)."))
            return self._fallback(q, k, v, batch)
        return out[0].transpose(0, 1)


def _compile_errors():
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler
    return TorchDynamoException, CppCompileError, InvalidCxxCompiler
