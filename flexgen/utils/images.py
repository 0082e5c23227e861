"""Images as flexgen writes them: grids of generated images and 8-bit PNG files."""
from typing import Sequence

import torch

from flexgen.fileio import atomic_path


def image_grid(images: Sequence[torch.Tensor], ncols: int, pad: int = 2) -> torch.Tensor:
    """Images ``[3, H, W]`` in [0, 1] of any sizes in a grid of equal cells (top-left
    aligned, gray padding), ``[3, H_grid, W_grid]``."""
    cell_h = max(im.shape[1] for im in images) + pad
    cell_w = max(im.shape[2] for im in images) + pad
    nrows = (len(images) + ncols - 1) // ncols
    grid = torch.full((3, nrows * cell_h + pad, ncols * cell_w + pad), 0.5)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        top, left = r * cell_h + pad, c * cell_w + pad
        grid[:, top:top + im.shape[1], left:left + im.shape[2]] = im
    return grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (float, any shape) -> uint8 ``round(255 x)``, halves rounded up.

    This is DiT's / ADM's ``clamp(127.5 x' + 128, 0, 255)`` on images ``x'`` in [-1, 1]
    (their truncation after ``+ 128`` rounds ``127.5 x' + 127.5`` half up), the pixels
    FID reference statistics are computed from. uint8 input passes through unchanged.
    """
    if images.dtype == torch.uint8:
        return images
    return (images.float() * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8)


def save_png(image: torch.Tensor, path: str) -> None:
    """Write ``[3, H, W]`` (float in [0, 1], or uint8) as an 8-bit PNG, atomically, with
    :func:`to_uint8`'s rounding."""
    from PIL import Image
    array = to_uint8(image.detach().cpu()).permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format='PNG')
