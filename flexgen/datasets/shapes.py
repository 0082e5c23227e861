"""The embedded demo dataset: procedurally drawn, class-conditional shapes."""
from itertools import groupby
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from flexgen.registry import DATASETS
from flexgen.rng import uniforms

from .base_dataset import FlexDataset

_GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: ops on fewer elements run on one thread

SHAPES = ('disc', 'square', 'triangle', 'cross', 'ring', 'bars')
DEFAULT_SIZES = ((16, 16), (24, 24), (16, 24), (24, 16), (32, 16), (16, 32))


def shape_mask(kind: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Which points of the grid ``u [..., 1, W] x v [..., H, 1]`` (coordinates in units of
    the shape's radius from its centre, v down) lie inside a shape: ``[..., H, W]`` bool.
    Every shape fits in the unit circle. Tests run on the 1-D axes where the shape allows
    (cheap) and broadcast to 2-D last."""
    au, av = u.abs(), v.abs()
    if kind == 'disc':
        return u * u + v * v <= 1
    if kind == 'square':
        return (au <= 0.7) & (av <= 0.7)
    if kind == 'triangle':
        # Equilateral, inscribed in the unit circle, apex (0, -1) up: base v <= 1/2 and
        # the two sides sqrt(3) |u| <= 1 + v.
        return (v <= 0.5) & (3 ** 0.5 * au <= 1 + v)
    if kind == 'cross':
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if kind == 'ring':
        rho2 = u * u + v * v
        return (rho2 >= 0.55 ** 2) & (rho2 <= 1)
    if kind == 'bars':  # two vertical bars
        return (au >= 0.25) & (au <= 0.75) & (av <= 0.66)
    raise KeyError(f"unknown shape '{kind}', expected one of {SHAPES}")


@DATASETS.register_module()
class ProceduralShapes(FlexDataset):
    """Shapes on a plain background, drawn on the fly: the class is the shape kind.

    Each class is one of ``SHAPES`` (disc, square, triangle, cross, ring, two bars),
    axis-aligned so that it stays recognisable at 16x16 px. The background colour is
    uniform in RGB; the shape colour differs from it by 0.35 to 0.65 in EVERY channel
    (``fg = (bg + 0.35 + 0.3 u) mod 1``), so both colours are uniformly distributed and
    say nothing about the class. ``palette='grey'`` keeps the red channel's draws and
    repeats them in all three (random grey levels, the same contrast): one colour
    dimension instead of three, which a tiny model learns about 3x faster (README, Demo).
    The shape's diameter is a random fraction ``scale`` of the image's short side, its
    centre random with the whole shape at least ``margin`` px inside the image. Edges are
    antialiased: the mask is evaluated on a ``supersample`` x finer grid and average-pooled
    (area coverage), so every pixel is ``bg + coverage * (fg - bg)``.

    Item ``i`` is a pure function of ``(seed, i)`` (keyed hashes,
    :func:`flexgen.rng.uniforms`): its label is ``i % num_classes`` (balanced), its size one
    of ``sizes`` drawn by hash. Nothing is downloaded or stored.

    Args:
        num_samples: the dataset length.
        sizes: (H, W) pixel sizes the images come in.
        seed: selects the whole dataset.
        classes: shape names to use (labels are their positions); default all of SHAPES.
        scale: (min, max) shape diameter as a fraction of the image's short side.
        margin: the smallest gap between the shape's bounding circle and the border (px).
        supersample: antialiasing factor.
        palette: ``'rgb'`` (random colours) or ``'grey'`` (random grey levels).

    Items: ``dict(inputs=Tensor[3, H, W] float32 in [-1, 1],
    data_samples=dict(label=int, index=int))``.
    """

    def __init__(self, num_samples: int = 10_000,
                 sizes: Sequence[Tuple[int, int]] = DEFAULT_SIZES, seed: int = 0,
                 classes: Optional[Sequence[str]] = None,
                 scale: Tuple[float, float] = (0.5, 0.85), margin: float = 1.0,
                 supersample: int = 4, palette: str = 'rgb'):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f'ProceduralShapes: num_samples must be a positive int, '
                             f'got {num_samples!r}')
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f'ProceduralShapes: seed must be a non-negative int, got {seed!r}')
        self.sizes = _check_sizes('ProceduralShapes', sizes)
        self.classes = tuple(SHAPES if classes is None else classes)
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f'ProceduralShapes: classes must be distinct names from {SHAPES}, '
                             f'got {classes!r}')
        if palette not in ('rgb', 'grey'):
            raise ValueError(f"ProceduralShapes: palette must be 'rgb' or 'grey', got {palette!r}")
        lo, hi = scale
        if not 0 < lo <= hi or any(hi * min(s) + 2 * margin > min(s) for s in self.sizes):
            raise ValueError(f'ProceduralShapes: scale={scale!r} with margin={margin} does '
                             f'not fit every size in {self.sizes} (need 0 < min <= max and '
                             'max * short side + 2 * margin <= short side)')
        self.num_samples, self.seed, self.palette = num_samples, seed, palette
        self.scale, self.margin, self.supersample = (float(lo), float(hi)), margin, supersample
        # Every item's draws, hashed at once into tables: batch samplers ask for every
        # index's size each epoch, and rendering only reads them.
        u = uniforms(seed, torch.arange(num_samples)[:, None], torch.arange(10))
        self._size_ids = (u[:, 0] * len(self.sizes)).long()
        hw = torch.tensor(self.sizes, dtype=torch.float64)[self._size_ids]
        radius = (lo + (hi - lo) * u[:, 1]) * hw.min(1).values / 2
        reach = radius + margin
        self._radius = radius.float()
        self._center = (reach[:, None] + (hw - 2 * reach[:, None]) * u[:, 2:4]).float()
        self._background = u[:, 4:7].float()
        self._foreground = (self._background + 0.35 + 0.3 * u[:, 7:10].float()) % 1
        if palette == 'grey':
            self._background = self._background[:, :1].expand(-1, 3).contiguous()
            self._foreground = self._foreground[:, :1].expand(-1, 3).contiguous()
        # Supersampled pixel-centre coordinates per side length.
        self._grid = {n: (torch.arange(n * supersample) + 0.5) / supersample
                      for n in {n for s in self.sizes for n in s}}

    def __len__(self) -> int:
        return self.num_samples

    def get_size(self, index: int) -> Tuple[int, int]:
        """(H, W) of item ``index``, without drawing it."""
        return self.sizes[self._size_ids[self.check_index(index)]]

    def get_label(self, index: int) -> int:
        return self.check_index(index) % len(self.classes)

    def params(self, index: int) -> dict:
        """The random draws behind item ``index``: radius and centre (px), colours in [0, 1]."""
        index = self.check_index(index)
        return dict(radius=float(self._radius[index]),
                    center=tuple(self._center[index].tolist()),
                    background=self._background[index], foreground=self._foreground[index])

    def render(self, indices: Sequence[int]) -> List[torch.Tensor]:
        """Images ``[3, H, W]`` in [-1, 1] of ``indices``, drawn in chunks of one size."""
        indices = [self.check_index(i) for i in indices]
        by_size = {}
        for j, i in enumerate(indices):
            by_size.setdefault(self.get_size(i), []).append(j)
        images = [None] * len(indices)
        for (h, w), where in by_size.items():
            where.sort(key=lambda j: indices[j] % len(self.classes))  # runs of one label
            # Chunks of fewer supersampled points than torch's intra-op grain size run on
            # one thread: on tensors this small, thread hand-off costs far more than it saves.
            step = max(1, (_GRAIN_SIZE - 1) // (h * w * self.supersample ** 2))
            for start in range(0, len(where), step):
                chunk = where[start:start + step]
                for j, image in zip(chunk, self._draw(h, w, [indices[j] for j in chunk])):
                    images[j] = image
        return images

    def _draw(self, h: int, w: int, indices: List[int]) -> torch.Tensor:
        """``[B, 3, H, W]`` images of ``indices`` (all of size (h, w), labels in runs)."""
        k, idx = self.supersample, torch.tensor(indices)
        radius = self._radius[idx][:, None, None]
        v = (self._grid[h][None, :, None] - self._center[idx, 0, None, None]) / radius
        u = (self._grid[w][None, None, :] - self._center[idx, 1, None, None]) / radius
        masks, start = [], 0
        for label, run in groupby(i % len(self.classes) for i in indices):
            end = start + len(list(run))
            masks.append(shape_mask(self.classes[label], u[start:end], v[start:end]))
            start = end
        mask = masks[0] if len(masks) == 1 else torch.cat(masks)
        coverage = mask.view(-1, h, k, w, k).float().mean((2, 4))  # k x k average pooling
        bg = self._background[idx][:, :, None, None]
        fg = self._foreground[idx][:, :, None, None]
        return torch.addcmul(bg * 2 - 1, (fg - bg) * 2, coverage[:, None])

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> List[dict]:
        """A whole batch at once (torch's DataLoader calls this when it exists)."""
        images = self.render(indices)
        return [dict(inputs=image, data_samples=dict(label=int(i) % len(self.classes),
                                                     index=int(i)))
                for i, image in zip(indices, images)]


def _check_sizes(owner: str, sizes) -> list:
    """``sizes`` as a list of (H, W) int tuples, or a ValueError naming the bad entry."""
    out = []
    for s in sizes:
        if (not isinstance(s, (tuple, list)) or len(s) != 2
                or not all(isinstance(x, (int, np.integer)) and x > 0 for x in s)):
            raise ValueError(f'{owner}: sizes must be (H, W) pairs of positive ints, got {s!r} '
                             f'in {sizes!r}')
        out.append((int(s[0]), int(s[1])))
    if not out:
        raise ValueError(f'{owner}: sizes is empty')
    return out
