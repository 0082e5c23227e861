"""A small inference API: build a generator from a config and weights, save image grids."""
import os
import os.path as osp
from typing import Optional, Sequence

import torch
from mmengine.config import Config

from flexgen.registry import MODELS


def load_weights(path: str, use_ema: bool = True) -> dict:
    """A flexgen state dict from a training checkpoint (``.pth``, EMA weights by default)
    or a weights file (``.safetensors``). Never executes pickled code."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if use_ema and 'ema_state_dict' in checkpoint:
        # mmengine's EMA wrapper stores the averaged model under 'module.' plus a step count.
        return {k[len('module.'):]: v for k, v in checkpoint['ema_state_dict'].items()
                if k.startswith('module.')}
    return checkpoint.get('state_dict', checkpoint)


def init_generator(config, checkpoint: Optional[str] = None, device: str = 'cpu',
                   use_ema: bool = True, cfg_options: Optional[dict] = None):
    """Build the config's ``model`` (a ``DiffusionGenerator``) and load ``checkpoint``."""
    import flexgen
    flexgen.register_all_modules()
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        missing, unexpected = model.load_state_dict(load_weights(checkpoint, use_ema),
                                                    strict=False)
        if missing or unexpected:
            raise KeyError(f'checkpoint {checkpoint!r} does not fit the config model: '
                           f'missing {missing[:5]}, unexpected {unexpected[:5]}')
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
    """Write ``[3, H, W]`` in [0, 1] as an 8-bit PNG (atomically: temp file + rename)."""
    from PIL import Image
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    tmp = f'{path}.tmp'
    Image.fromarray(array).save(tmp, format='PNG')
    os.replace(tmp, path)
