"""Attention backends: block-diagonal attention over a jagged token batch.

Every backend computes, for each image i of a :class:`~flexgen.structures.TokenBatch`,
``softmax(q_i k_i^T * scale) v_i`` on that image's tokens only. They differ only in how:

- ``sdpa``: one dense batched ``scaled_dot_product_attention`` when all images have the
  same length (DiT's case, no overhead); otherwise one dense call per run (or group) of
  equal-length images (cost ``sum n_i^2``, never ``(sum n_i)^2``). The fastest CPU path:
  within ~5% of the per-image limit on an ImageNet-like pack (``tools/benchmark.py``).
- ``padded``: FiT's way: pad every image to the longest, mask, one SDPA call.
- ``per_image``: the plainest loop, one SDPA call per image (the reference the others are
  tested against).
- ``flex`` (``attention_flex.py``): torch FlexAttention with a document block mask.
- ``flash_varlen``, ``torch_varlen``, ``xformers`` (``attention_varlen.py``): the GPU
  varlen kernels (flash-attn and xformers are optional extras, ``pip install flexgen[gpu]``;
  ``torch_varlen`` is PyTorch's own FlashAttention-2 varlen kernel).
- ``auto``: per call, dense ``sdpa`` for equal lengths, else the preferred packed kernel
  that runs on the device and dtype (see :class:`AutoAttention`).

A backend (:mod:`.attention_base`) is a callable ``(q, k, v, batch) -> out`` on
``[N, heads, head_dim]`` tensors. A new one is one class here (or in your own module)
and one config line.
"""
import inspect

import torch
import torch.nn.functional as F

from flexgen.registry import ATTENTION_BACKENDS
from .attention_base import AttentionBackend


def _sdpa(q, k, v):
    """``[..., n, H, d]`` inputs -> ``[..., n, H, d]`` (SDPA wants heads before tokens; the
    transposes are views, and CPU / CUDA SDPA kernels read these strides directly)."""
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2),
                                         v.transpose(-3, -2))
    return out.transpose(-3, -2)


def _cpu_flash_kernels():
    """PyTorch's CPU flash-attention forward / backward ops (what SDPA runs on CPU), or
    ``None`` in a torch without them."""
    ops = torch.ops.aten
    try:
        return (ops._scaled_dot_product_flash_attention_for_cpu.default,
                ops._scaled_dot_product_flash_attention_for_cpu_backward.default)
    except (AttributeError, RuntimeError):
        return None


class _SegmentAttention(torch.autograd.Function):
    """Block-diagonal attention by CPU flash kernels, one call per segment of images.

    ``segments`` are ``(first token, images, tokens per image)`` in the token order of
    ``x[order]`` (``order=None``: the batch order). Each kernel call reads a
    ``[count, heads, n, head_dim]`` strided view (no transpose copy) and its result is
    written once into a preallocated output (scattered back by ``order``); the backward
    calls the matching backward kernel per segment and writes into preallocated
    gradients. No per-image autograd graph, no zero-filled ``[N, ...]`` gradients.
    """

    @staticmethod
    def forward(ctx, q, k, v, segments, order):
        forward_kernel, _ = _cpu_flash_kernels()
        if order is not None:
            q, k, v = (x.index_select(0, order) for x in (q, k, v))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        outs, lses = [], []
        for start, count, n in segments:
            o, lse = forward_kernel(*(_run_view(x, start, count, n) for x in (q, k, v)))
            _write(out, o, start, count, n, order)
            outs.append(o)
            lses.append(lse)
        ctx.save_for_backward(q, k, v, *outs, *lses)
        ctx.segments, ctx.order = segments, order
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        _, backward_kernel = _cpu_flash_kernels()
        segments, order = ctx.segments, ctx.order
        q, k, v, *rest = ctx.saved_tensors
        outs, lses = rest[:len(segments)], rest[len(segments):]
        if order is not None:
            grad_out = grad_out.index_select(0, order)
        grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
        for (start, count, n), o, lse in zip(segments, outs, lses):
            views = (_run_view(x, start, count, n) for x in (grad_out, q, k, v))
            for grad, part in zip(grads, backward_kernel(*views, o, lse, 0.0, False)):
                _write(grad, part, start, count, n, order)
        return (*grads, None, None)


def _write(dest, part, start, count, n, order):
    """Write a kernel result ``[count, H, n, d]`` to its tokens of ``dest`` ``[N, H, d]``."""
    if order is None:
        _run_view(dest, start, count, n).copy_(part)
    else:
        dest.index_copy_(0, order[start:start + count * n], part.transpose(1, 2).flatten(0, 1))


def _run_view(x, start, count, n):
    """Tokens ``start .. start + count * n`` of ``[N, H, d]`` as ``[count, H, n, d]``."""
    return x[start:start + count * n].unflatten(0, (count, n)).transpose(1, 2)


@ATTENTION_BACKENDS.register_module(name='per_image')
class PerImageAttention(AttentionBackend):
    """One dense SDPA call per image: the plainest loop, the reference for the others."""

    def __call__(self, q, k, v, batch):
        outs = [_sdpa(qi, ki, vi) for qi, ki, vi in
                zip(batch.split(q), batch.split(k), batch.split(v))]
        return torch.cat(outs) if outs else q.new_zeros(q.shape)


@ATTENTION_BACKENDS.register_module(name='sdpa')
class SDPAAttention(AttentionBackend):
    """Dense SDPA per run or per group of equal-length images: cost ``sum n_i^2``, never
    ``(sum n_i)^2``.

    A uniform batch (DiT) is one batched call on views, without a copy. A mixed batch is
    cut into segments of equal-length images, each one ``[count, heads, n, head_dim]``
    call, in one of two plans:

    - ``'runs'``: runs of consecutive equal-length images, read in place (strided views,
      no gather);
    - ``'grouped'``: all images of one length in one call (``Geometry.length_groups``);
      the tokens are gathered once so each group is contiguous, and scattered back.

    Plans live in the batch's geometry (built once for all layers, by the collate in
    training). On CPU the segments run
    through torch's CPU flash kernels directly (:class:`_SegmentAttention`: no
    per-segment autograd graph, results written once into preallocated tensors);
    elsewhere through ``scaled_dot_product_attention`` with autograd.

    The CPU kernel costs the same per image batched or not, so on CPU ``'runs'`` is the
    better default: no gathers, within ~5% of the per-image limit on an ImageNet-like
    pack; ``'grouped'`` makes fewer kernel calls and wins only when the cores are
    oversubscribed (each call then waits for its threads). GPUs run fewer, larger
    launches better, so ``'auto'`` takes ``'grouped'`` there. ``tools/benchmark.py``
    measures both.

    Args:
        strategy: ``'auto'`` (``'runs'`` on CPU, ``'grouped'`` elsewhere), ``'runs'`` or
            ``'grouped'``.
    """

    def __init__(self, strategy='auto'):
        if strategy not in ('auto', 'runs', 'grouped'):
            raise ValueError(f"SDPAAttention: strategy must be 'auto', 'runs' or "
                             f"'grouped', got {strategy!r}")
        self.strategy = strategy

    def __call__(self, q, k, v, batch):
        if batch.is_uniform:
            return _sdpa(batch.dense(q), batch.dense(k), batch.dense(v)).reshape(q.shape)
        on_cpu = q.device.type == 'cpu' and _cpu_flash_kernels() is not None
        strategy = self.strategy
        if strategy == 'auto':
            strategy = 'runs' if on_cpu else 'grouped'
        if strategy == 'runs':
            segments, order = batch.geometry.runs(), None
        else:
            groups = batch.geometry.length_groups()
            segments, order = _group_segments(groups), groups.order
        if on_cpu:
            q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
            return _SegmentAttention.apply(q, k, v, segments, order)
        return _segment_sdpa(q, k, v, segments, order)


def _group_segments(groups):
    segments, start = [], 0
    for n, count in zip(groups.lengths, groups.counts):
        segments.append((start, count, n))
        start += n * count
    return segments


def _segment_sdpa(q, k, v, segments, order):
    """The segments with ``scaled_dot_product_attention`` and autograd (any device)."""
    if order is not None:
        q, k, v = (x.index_select(0, order) for x in (q, k, v))
    sizes = [count * n for _, count, n in segments]
    # torch.split: one autograd node whose backward is one cat (slicing each segment
    # would zero-fill a whole [N, H, d] gradient per segment)
    outs = [_sdpa(*(x.unflatten(0, (count, n)) for x in parts)).flatten(0, 1)
            for (_, count, n), *parts in zip(segments, *(torch.split(x, sizes)
                                                         for x in (q, k, v)))]
    out = torch.cat(outs)
    if order is None:
        return out
    return torch.empty_like(out).index_copy_(0, order, out)


@ATTENTION_BACKENDS.register_module(name='padded')
class PaddedAttention(AttentionBackend):
    """Pad every image to the longest and mask, as FiT does (Lu et al. 2024, section 3.2).

    :meth:`attend` is FiT's masked computation on a padded batch: valid tokens attend to
    valid tokens of their image, padded slots only to padded slots (``mask_i == mask_j``,
    so no softmax row is empty), and the output of padded slots is set to zero. Called as
    a backend it pads the jagged batch, attends, and returns the valid rows.
    """

    @staticmethod
    def pad(x, batch):
        """``[N, ...]`` -> ``([B, L, ...]`` zero-padded, ``valid`` ``[B, L]`` bool), with
        ``L`` the longest image; each image's tokens first, padding after them."""
        local = torch.arange(x.shape[0], device=x.device) - \
            batch.cu_seqlens[:-1].long()[batch.image_ids]
        index = (batch.image_ids, local)
        padded = x.new_zeros((batch.num_images, batch.max_seqlen) + tuple(x.shape[1:]))
        padded[index] = x
        valid = torch.zeros(batch.num_images, batch.max_seqlen, dtype=torch.bool,
                            device=x.device)
        valid[index] = True
        return padded, valid

    @staticmethod
    def attend(q, k, v, valid):
        """Masked attention on padded ``[B, L, heads, head_dim]`` with ``valid`` ``[B, L]``;
        padded rows of the output are zero."""
        mask = valid[:, None, :, None] == valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2) * valid[:, :, None, None].to(out.dtype)

    def __call__(self, q, k, v, batch):
        (qp, valid), (kp, _), (vp, _) = (self.pad(x, batch) for x in (q, k, v))
        return self.attend(qp, kp, vp, valid)[valid]


@ATTENTION_BACKENDS.register_module(name='auto')
class AutoAttention(AttentionBackend):
    """The fastest exact backend for the device, dtype and batch of each call.

    - a uniform batch (every image the same length: DiT): ``'sdpa'``, one dense batched
      call (torch's flash / memory-efficient kernels on a GPU);
    - otherwise the registered packed kernels (:mod:`.attention_base`) that run on the
      device and dtype, by ``auto_priority``, the first one installed: on CUDA in
      float16 / bfloat16 ``'flash_varlen'``, ``'torch_varlen'``, ``'xformers'``, then
      ``'flex'`` (the FlashAttention-2 kernels on compute capability 8.0 and newer only);
      on CUDA in float32 ``'flex'`` (compiled FlexAttention with a document mask: 4.7x faster than
      grouped ``'sdpa'`` on a 16k-token ImageNet-like pack on an H200,
      tools/gpu_check.py);
    - none of them: ``'sdpa'`` (on CPU the fastest path in ``tools/benchmark.py``;
      ``'flex'`` has no CPU backward, and its compiled CPU forward measured slower).

    Never the dense masked SDPA over the whole pack, which costs ``(sum n_i)^2``.
    """

    def __init__(self):
        self._chosen = {}

    @staticmethod
    def candidates(device, dtype):
        """The registered packed kernels for ``device`` and ``dtype``, preferred first."""
        ranked = sorted((cls.auto_priority, name)
                        for name, cls in ATTENTION_BACKENDS.module_dict.items()
                        if inspect.isclass(cls) and issubclass(cls, AttentionBackend)
                        and cls.auto_priority is not None and cls.runs_packed(device, dtype))
        return [name for _, name in ranked]

    @staticmethod
    def choose(device, dtype, uniform=False):
        """The backend name ``'auto'`` uses for tensors on ``device`` of ``dtype`` (the
        autocast dtype where autocast is on for the device)."""
        device = torch.device(device)
        if uniform:
            return 'sdpa'
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        for name in AutoAttention.candidates(device, dtype):
            try:
                build_attention_backend(name)
            except ImportError:
                continue
            return name
        return 'sdpa'

    def __call__(self, q, k, v, batch):
        key = (q.device.type, q.dtype, torch.is_autocast_enabled(q.device.type),
               batch.is_uniform)
        if key not in self._chosen:
            self._chosen[key] = build_attention_backend(
                self.choose(q.device, q.dtype, batch.is_uniform))
        return self._chosen[key](q, k, v, batch)


def build_attention_backend(cfg):
    """A backend from a name (``'sdpa'``), a config dict, or a ready callable."""
    if isinstance(cfg, str):
        cfg = dict(type=cfg)
    if isinstance(cfg, dict):
        return ATTENTION_BACKENDS.build(cfg)
    return cfg
