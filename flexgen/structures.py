"""The jagged token batch: one structure for fixed-size, padded and packed batches.

Images of any sizes travel through the model as their patches concatenated end to end:

- ``tokens`` ``[N, D]``: every image's patches in row-major order, images concatenated;
- ``sizes`` ``[B, 2]``: ``(h, w)`` of each image in patches (kept on the CPU: it drives
  Python-side splitting and never costs a device sync);
- derived on demand: ``seqlens`` ``[B]``, ``cu_seqlens`` ``[B+1]`` (int32),
  ``image_ids`` ``[N]`` (which image a token belongs to) and ``positions`` ``[N, 2]``
  (row, col of each token in its image's patch grid).

A token attends only to the tokens of its own image; how that is computed is the
attention backend's business (``flexgen.models.layers.attention_backends``).
Per-image quantities (time, class, modulation) stay ``[B, ...]`` and are broadcast to
tokens with :meth:`TokenBatch.per_token` only where an elementwise op needs them.
"""
from dataclasses import dataclass
from functools import cached_property
from typing import List, Sequence

import torch
from torch import Tensor


@dataclass(eq=False)
class TokenBatch:
    tokens: Tensor
    sizes: Tensor

    def __post_init__(self):
        self.sizes = torch.as_tensor(self.sizes, dtype=torch.long, device='cpu').reshape(-1, 2)
        n = int(self.sizes.prod(1).sum())
        if self.tokens.shape[0] != n:
            raise ValueError(f'TokenBatch: tokens has {self.tokens.shape[0]} rows but sizes '
                             f'{self.sizes.tolist()} describe {n} tokens')

    # ------------------------------------------------------------------ geometry
    @property
    def num_images(self) -> int:
        return self.sizes.shape[0]

    @property
    def device(self):
        return self.tokens.device

    @cached_property
    def seqlens_list(self) -> List[int]:
        return self.sizes.prod(1).tolist()

    @cached_property
    def max_seqlen(self) -> int:
        return max(self.seqlens_list) if self.seqlens_list else 0

    @cached_property
    def is_uniform(self) -> bool:
        """All images have the same number of tokens (DiT's case: dense batched ops)."""
        return len(set(self.seqlens_list)) <= 1

    @cached_property
    def seqlens(self) -> Tensor:
        return torch.tensor(self.seqlens_list, dtype=torch.long, device=self.device)

    @cached_property
    def cu_seqlens(self) -> Tensor:
        cu = torch.zeros(self.num_images + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(self.sizes.prod(1), 0)
        return cu.to(self.device)

    @cached_property
    def image_ids(self) -> Tensor:
        return torch.repeat_interleave(
            torch.arange(self.num_images, device=self.device), self.seqlens,
            output_size=self.tokens.shape[0])

    @cached_property
    def positions(self) -> Tensor:
        """``[N, 2]`` long: (row, col) of every token in its image's patch grid."""
        return grid_positions(self.sizes).to(self.device)

    # ------------------------------------------------------------------ helpers
    def replace(self, tokens: Tensor) -> 'TokenBatch':
        """The same geometry with other per-token values (geometry caches are shared)."""
        if tokens.shape[0] != self.tokens.shape[0]:
            raise ValueError(f'replace: {tokens.shape[0]} tokens for a batch of '
                             f'{self.tokens.shape[0]}')
        new = TokenBatch.__new__(TokenBatch)
        new.tokens, new.sizes = tokens, self.sizes
        for key in ('seqlens_list', 'max_seqlen', 'is_uniform'):
            if key in self.__dict__:
                new.__dict__[key] = self.__dict__[key]
        if tokens.device == self.device:
            for key in ('seqlens', 'cu_seqlens', 'image_ids', 'positions'):
                if key in self.__dict__:
                    new.__dict__[key] = self.__dict__[key]
        return new

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
                          self.sizes.repeat(times, 1))

    @staticmethod
    def cat(batches: Sequence['TokenBatch']) -> 'TokenBatch':
        return TokenBatch(torch.cat([b.tokens for b in batches]),
                          torch.cat([b.sizes for b in batches]))


def grid_positions(sizes: Tensor) -> Tensor:
    """(row, col) of every patch of images of ``sizes`` ``[B, 2]``, row-major, ``[N, 2]``."""
    sizes = torch.as_tensor(sizes, dtype=torch.long).reshape(-1, 2)
    counts = sizes.prod(1)
    if len(counts) == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    ids = torch.repeat_interleave(torch.arange(len(counts)), counts)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum())) - starts[ids]
    widths = sizes[ids, 1]
    return torch.stack([local // widths, local % widths], dim=1)


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
    return TokenBatch(torch.cat(tokens), torch.tensor(sizes, dtype=torch.long))


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
