"""A small inference API: build a generator from a config and its weights."""
import logging
from typing import Optional

from mmengine.config import Config

from flexgen.fileio import load_checked, read_checkpoint, select_weights
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
