"""A small inference API: build a generator from a config and weights, save image grids."""
import logging
from typing import Optional, Sequence

import torch
from mmengine.config import Config

from flexgen.fileio import atomic_path, load_checked, read_checkpoint, select_weights
from flexgen.registry import MODELS

logger = logging.getLogger(__name__)


def load_weights(path: str, use_ema: bool = True) -> dict:
    """A flexgen state dict from a training checkpoint (``.pth``: EMA weights by default,
    read as mmengine's ``EMAHook`` stores them, see :func:`flexgen.fileio.select_weights`)
    or a weights file (``.safetensors``). Never executes pickled code."""
    state, kind = select_weights(read_checkpoint(path), use_ema, where=path)
    logger.info('%s: %s weights', path, kind)
    return state


def init_generator(config, checkpoint: Optional[str] = None, device: str = 'cpu',
                   use_ema: bool = True, cfg_options: Optional[dict] = None):
    """Build the config's ``model`` (a ``DiffusionGenerator``) and load ``checkpoint``
    (EMA weights unless ``use_ema=False``); a checkpoint that does not fit the model
    (keys, shapes, dtypes, non-finite values) is refused with every problem named."""
    import flexgen
    flexgen.register_all_modules()
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        load_checked(model, load_weights(checkpoint, use_ema), f'checkpoint {checkpoint}')
    return model.to(device).eval()


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


def save_png(image: torch.Tensor, path: str) -> None:
    """Write ``[3, H, W]`` in [0, 1] as an 8-bit PNG (atomically)."""
    from PIL import Image
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format='PNG')
