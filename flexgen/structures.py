"""The jagged token batch: one structure for fixed-size, padded and packed batches.

Images of any sizes travel through the model as their patches concatenated end to end:

- ``tokens`` ``[N, D]``: every image's patches in row-major order, images concatenated;
- ``sizes`` ``[B, 2]``: ``(h, w)`` of each image in patches (kept on the host: it drives
  Python-side splitting and never costs a device sync);
- its :class:`Geometry`: everything that depends on the sizes alone: ``seqlens`` ``[B]``,
  ``cu_seqlens`` ``[B+1]`` (int32), ``image_ids`` ``[N]`` (which image a token belongs
  to), ``local_index`` ``[N]`` (the token's index in its image), ``positions`` ``[N, 2]``
  (row, col in the image's patch grid), ``image_sizes`` (``sizes`` on the device) and
  the segment plans of the attention backends.

The geometry is computed once per layout and shared by every batch of that layout
(:meth:`TokenBatch.replace`: the sampling steps of a generation, the blocks of a
forward pass). In training the collate builds it on the host, in the data workers, and the
whole batch moves to the device in non-blocking copies (:meth:`TokenBatch.pin_memory`,
:meth:`TokenBatch.to`); elsewhere it is built lazily on the batch's device.

A token attends only to the tokens of its own image; how that is computed is the
attention backend's business (``flexgen.models.layers.attention_backends``).
Per-image quantities (time, class, modulation) stay ``[B, ...]`` and are broadcast to
tokens with :meth:`TokenBatch.per_token` only where an elementwise op needs them.
"""
from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.utils import apply_to
from torch import Tensor


class LengthGroups(NamedTuple):
    """A jagged batch's images grouped by token count.

    Group ``g`` holds ``counts[g]`` images of ``lengths[g]`` tokens each. ``order`` lists
    the token indices of group 0's images, then group 1's, ... (each image's tokens in
    order), so the tokens of a group are one contiguous ``[count * n]`` range of
    ``x[order]``. It is ``None`` when the batch is already in that order (e.g. images
    sorted by length), which saves the gathers.
    """
    lengths: List[int]
    counts: List[int]
    order: Optional[Tensor]


def host_to_device(tensor: Tensor, device) -> Tensor:
    """A small host tensor on ``device`` without blocking the host: page-locked first, then
    a non-blocking copy, where the device is an accelerator (a plain ``.to`` from pageable
    memory waits for the copy)."""
    device = torch.device(device)
    if device.type == 'cpu':
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _move(value, device, non_blocking=False):
    """Tensors inside plain containers / named tuples moved to ``device``."""
    return apply_to(value, lambda x: isinstance(x, Tensor),
                    lambda x: x.to(device, non_blocking=non_blocking))


def _pin(value):
    """Tensors inside plain containers / named tuples in pinned host memory."""
    return apply_to(value, lambda x: isinstance(x, Tensor), Tensor.pin_memory)


class Geometry:
    """The layout of a jagged batch of images of ``sizes`` ``[B, 2]`` (patches), on one
    device: host-side facts (``seqlens_list``, ``max_seqlen``, ``is_uniform``) and
    tensors built on first use (or all at once by :meth:`build`).

    ``plans`` holds the attention backends' segment plans; :meth:`runs` and
    :meth:`length_groups` are the two built in.
    """

    TENSORS = ('seqlens', 'cu_seqlens', 'image_ids', 'local_index', 'positions',
               'image_sizes')

    def __init__(self, sizes, device='cpu'):
        self.sizes = torch.as_tensor(sizes, dtype=torch.long, device='cpu').reshape(-1, 2)
        self.seqlens_list: List[int] = self.sizes.prod(1).tolist()
        self.num_tokens = sum(self.seqlens_list)
        self.max_seqlen = max(self.seqlens_list, default=0)
        self.is_uniform = len(set(self.seqlens_list)) <= 1
        self.device = torch.device(device)
        self.tensors: Dict[str, Tensor] = {}
        self.plans: dict = {}

    @property
    def num_images(self) -> int:
        return len(self.seqlens_list)

    # ------------------------------------------------------------------ tensors
    def tensor(self, name: str) -> Tensor:
        """One of :attr:`TENSORS`, on this geometry's device (built on first use)."""
        if name not in self.tensors:
            self.tensors[name] = getattr(self, f'_build_{name}')()
        return self.tensors[name]

    def _build_seqlens(self):
        return torch.tensor(self.seqlens_list, dtype=torch.long, device=self.device)

    def _build_cu_seqlens(self):
        cu = torch.zeros(self.num_images + 1, dtype=torch.int32, device=self.device)
        torch.cumsum(self.tensor('seqlens'), 0, out=cu[1:])
        return cu

    def _build_image_ids(self):
        return torch.repeat_interleave(torch.arange(self.num_images, device=self.device),
                                       self.tensor('seqlens'), output_size=self.num_tokens)

    def _build_local_index(self):
        starts = self.tensor('cu_seqlens')[:-1].long()
        return torch.arange(self.num_tokens, device=self.device) - starts[self.tensor('image_ids')]

    def _build_image_sizes(self):
        # a tensor of its own even on the host: the host-side ``sizes`` never aliases a
        # device tensor (what a host-sync count on a CPU tells apart)
        return self.sizes.to(self.device, copy=True)

    def _build_positions(self):
        widths = self.tensor('image_sizes')[:, 1][self.tensor('image_ids')]
        local = self.tensor('local_index')
        return torch.stack([local // widths, local % widths], dim=1)

    # ------------------------------------------------------------------ plans
    def runs(self) -> List[Tuple[int, int, int]]:
        """``(first token, images, tokens per image)`` of each run of consecutive images of
        equal length, in batch order (a uniform batch is one run)."""
        if 'runs' not in self.plans:
            runs, start = [], 0
            for n in self.seqlens_list:
                if runs and runs[-1][2] == n:
                    runs[-1][1] += 1
                else:
                    runs.append([start, 1, n])
                start += n
            self.plans['runs'] = [tuple(run) for run in runs]
        return self.plans['runs']

    def length_groups(self) -> LengthGroups:
        """The images grouped by token count (:class:`LengthGroups`)."""
        if 'length_groups' not in self.plans:
            members = defaultdict(list)  # insertion order: groups by first appearance
            for i, n in enumerate(self.seqlens_list):
                members[n].append(i)
            lengths, counts = list(members), [len(ids) for ids in members.values()]
            image_order = [i for ids in members.values() for i in ids]
            order = None
            if image_order != sorted(image_order):
                starts = np.concatenate([[0], np.cumsum(self.seqlens_list[:-1])]).astype(np.int64)
                order = torch.from_numpy(np.concatenate(
                    [(starts[ids, None] + np.arange(n)).ravel() for n, ids in members.items()]))
                order = order.to(self.device)
            self.plans['length_groups'] = LengthGroups(lengths, counts, order)
        return self.plans['length_groups']

    def build(self) -> 'Geometry':
        """Every tensor and plan now (the collate does this on the host)."""
        for name in self.TENSORS:
            self.tensor(name)
        self.runs()
        self.length_groups()
        return self

    # ------------------------------------------------------------------ devices
    def _copy(self, tensors, plans, device) -> 'Geometry':
        new = Geometry.__new__(Geometry)
        new.__dict__.update(self.__dict__)
        new.tensors, new.plans, new.device = tensors, plans, torch.device(device)
        return new

    def to(self, device, non_blocking: bool = False) -> 'Geometry':
        device = torch.device(device)
        if device == self.device:
            return self
        return self._copy(_move(self.tensors, device, non_blocking),
                          _move(self.plans, device, non_blocking), device)

    def pin_memory(self) -> 'Geometry':
        return self._copy(_pin(self.tensors), _pin(self.plans), self.device)


class TokenBatch:
    """Tokens ``[N, D]`` of images of ``sizes`` ``[B, 2]`` (patches), concatenated.

    Args:
        tokens: ``[N, D]``.
        sizes: ``[B, 2]`` (or anything ``torch.as_tensor`` reads); kept on the host.
        geometry: a :class:`Geometry` of these sizes to share (built if not given).
        patch_size: the patch size the tokens were made with, when known (the model
            checks it against its own).
    """

    def __init__(self, tokens: Tensor, sizes=None, geometry: Optional[Geometry] = None,
                 patch_size: Optional[int] = None):
        if geometry is None:
            geometry = Geometry(sizes, tokens.device)
        elif geometry.device != tokens.device:
            geometry = geometry.to(tokens.device)
        if tokens.shape[0] != geometry.num_tokens:
            raise ValueError(f'TokenBatch: tokens has {tokens.shape[0]} rows but sizes '
                             f'{geometry.sizes.tolist()} describe {geometry.num_tokens} tokens')
        self.tokens, self.geometry, self.patch_size = tokens, geometry, patch_size

    # ------------------------------------------------------------------ geometry
    @property
    def sizes(self) -> Tensor:
        return self.geometry.sizes

    @property
    def num_images(self) -> int:
        return self.geometry.num_images

    @property
    def device(self):
        return self.tokens.device

    @property
    def seqlens_list(self) -> List[int]:
        return self.geometry.seqlens_list

    @property
    def max_seqlen(self) -> int:
        return self.geometry.max_seqlen

    @property
    def is_uniform(self) -> bool:
        """All images have the same number of tokens (DiT's case: dense batched ops)."""
        return self.geometry.is_uniform

    @property
    def seqlens(self) -> Tensor:
        return self.geometry.tensor('seqlens')

    @property
    def cu_seqlens(self) -> Tensor:
        return self.geometry.tensor('cu_seqlens')

    @property
    def image_ids(self) -> Tensor:
        return self.geometry.tensor('image_ids')

    @property
    def local_index(self) -> Tensor:
        return self.geometry.tensor('local_index')

    @property
    def positions(self) -> Tensor:
        """``[N, 2]`` long: (row, col) of every token in its image's patch grid."""
        return self.geometry.tensor('positions')

    @property
    def image_sizes(self) -> Tensor:
        """``sizes`` on the batch's device."""
        return self.geometry.tensor('image_sizes')

    # ------------------------------------------------------------------ devices
    def to(self, device, non_blocking: bool = False) -> 'TokenBatch':
        return TokenBatch(self.tokens.to(device, non_blocking=non_blocking),
                          geometry=self.geometry.to(device, non_blocking),
                          patch_size=self.patch_size)

    def pin_memory(self) -> 'TokenBatch':
        """Page-locked host copies (what a DataLoader with ``pin_memory=True`` calls), so
        :meth:`to` a GPU does not block the host."""
        return TokenBatch(self.tokens.pin_memory(), geometry=self.geometry.pin_memory(),
                          patch_size=self.patch_size)

    # ------------------------------------------------------------------ helpers
    def replace(self, tokens: Tensor) -> 'TokenBatch':
        """The same geometry (shared, with its plans) with other per-token values."""
        if tokens.shape[0] != self.tokens.shape[0]:
            raise ValueError(f'replace: {tokens.shape[0]} tokens for a batch of '
                             f'{self.tokens.shape[0]}')
        return TokenBatch(tokens, geometry=self.geometry, patch_size=self.patch_size)

    def split(self, x: Tensor) -> List[Tensor]:
        """Per-token ``[N, ...]`` -> list of per-image ``[n_i, ...]`` (views)."""
        return list(torch.split(x, self.seqlens_list, dim=0))

    def per_token(self, per_image: Tensor) -> Tensor:
        """Broadcast per-image ``[B, ...]`` values to tokens ``[N, ...]``."""
        if self.is_uniform and self.num_images:
            n = self.seqlens_list[0]
            shape = (self.num_images, n) + tuple(per_image.shape[1:])
            return per_image.unsqueeze(1).expand(shape).reshape((-1,) + shape[2:])
        return per_image.index_select(0, self.image_ids)

    def dense(self, x: Tensor) -> Tensor:
        """``[N, ...]`` -> ``[B, n, ...]`` for a uniform batch (a view, no copy)."""
        if not self.is_uniform:
            raise ValueError('dense() needs images of equal token counts')
        return x.view((self.num_images, -1) + tuple(x.shape[1:]))

    def repeat(self, times: int) -> 'TokenBatch':
        """The batch concatenated with itself ``times`` times (e.g. for guidance)."""
        return TokenBatch(self.tokens.repeat((times,) + (1,) * (self.tokens.dim() - 1)),
                          self.sizes.repeat(times, 1), patch_size=self.patch_size)

    @staticmethod
    def cat(batches: Sequence['TokenBatch']) -> 'TokenBatch':
        return TokenBatch(torch.cat([b.tokens for b in batches]),
                          torch.cat([b.sizes for b in batches]),
                          patch_size=batches[0].patch_size if batches else None)


def channels_first(image):
    """A numpy image ``[H, W, C]`` (a decoded file) -> a tensor ``[C, H, W]`` of its
    values (copied only when needed: read-only arrays of PIL images get one); tensors and
    other arrays' dims pass through."""
    if not isinstance(image, np.ndarray):
        return image
    tensor = torch.from_numpy(np.require(image, requirements=['C', 'W']))
    return tensor.permute(2, 0, 1) if tensor.dim() == 3 else tensor


class ImageGroups:
    """Images of several sizes stacked per size: ``images[g]`` ``[k_g, C, H_g, W_g]`` holds
    the images at batch positions ``index[g]`` ``[k_g]`` (what the collate makes of a
    per-item image field, e.g. REPA's clean images, so each size moves to the device in
    one copy and is encoded in one call). ``index`` stays on the host."""

    def __init__(self, images: List[Tensor], index: List[Tensor]):
        if len(images) != len(index):
            raise ValueError(f'ImageGroups: {len(images)} stacks for {len(index)} index lists')
        self.images, self.index = list(images), list(index)

    @classmethod
    def from_items(cls, items: Sequence) -> 'ImageGroups':
        """Group per-item images (tensors ``[C, H, W]``, or uint8 arrays ``[H, W, C]``)."""
        groups = defaultdict(list)
        tensors = []
        for i, item in enumerate(items):
            item = channels_first(item)
            tensors.append(item)
            groups[(tuple(item.shape), item.dtype)].append(i)
        return cls([torch.stack([tensors[i] for i in ids]) for ids in groups.values()],
                   [torch.tensor(ids, dtype=torch.long) for ids in groups.values()])

    def __len__(self) -> int:
        return sum(len(ids) for ids in self.index)

    def to(self, device, non_blocking: bool = False) -> 'ImageGroups':
        return ImageGroups(_move(self.images, device, non_blocking), self.index)

    def pin_memory(self) -> 'ImageGroups':
        return ImageGroups(_pin(self.images), self.index)


def grid_positions(sizes: Tensor) -> Tensor:
    """(row, col) of every patch of images of ``sizes`` ``[B, 2]``, row-major, ``[N, 2]``."""
    return Geometry(sizes).tensor('positions')


def patchify(images: Sequence[Tensor], patch_size: int) -> TokenBatch:
    """Images ``[C, H, W]`` of any sizes -> a :class:`TokenBatch` of ``C*p*p`` tokens.

    Each token holds one ``p x p`` patch flattened in ``(c, p1, p2)`` order; patches are
    taken in row-major order. ``H`` and ``W`` must be multiples of ``p``.
    """
    p = patch_size
    tokens, sizes = [], []
    for i, image in enumerate(images):
        if image.dim() != 3:
            raise ValueError(f'patchify: image {i} has shape {tuple(image.shape)}, '
                             'expected [C, H, W]')
        c, h, w = image.shape
        if h % p or w % p:
            raise ValueError(f'patchify: image {i} is {h}x{w}, which is not divisible by the '
                             f'patch size {p}; resize or crop it to a multiple of {p}')
        x = image.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4)
        tokens.append(x.reshape((h // p) * (w // p), c * p * p))
        sizes.append((h // p, w // p))
    if not tokens:
        raise ValueError('patchify: no images')
    return TokenBatch(torch.cat(tokens), torch.tensor(sizes, dtype=torch.long),
                      patch_size=patch_size)


def unpatchify(tokens: Tensor, sizes: Tensor, patch_size: int) -> List[Tensor]:
    """Inverse of :func:`patchify`: ``[N, C*p*p]`` tokens -> list of ``[C, h*p, w*p]``."""
    p = patch_size
    sizes = torch.as_tensor(sizes, dtype=torch.long).reshape(-1, 2)
    channels = tokens.shape[1] // (p * p)
    if channels * p * p != tokens.shape[1]:
        raise ValueError(f'unpatchify: token width {tokens.shape[1]} is not C*{p}*{p}')
    out = []
    for x, (h, w) in zip(torch.split(tokens, sizes.prod(1).tolist()), sizes.tolist()):
        x = x.reshape(h, w, channels, p, p).permute(2, 0, 3, 1, 4)
        out.append(x.reshape(channels, h * p, w * p))
    return out
