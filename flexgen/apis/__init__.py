from flexgen.utils.images import image_grid, save_png

from .inference import init_generator, load_weights
from .official import load_official

__all__ = ['image_grid', 'init_generator', 'load_weights', 'save_png', 'load_official']
