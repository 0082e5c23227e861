from .inference import image_grid, init_generator, load_weights, save_png
from .official import load_official

__all__ = ['image_grid', 'init_generator', 'load_weights', 'save_png', 'load_official']
