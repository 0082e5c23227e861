from .inference import image_grid, init_generator, load_weights, save_png

__all__ = ['image_grid', 'init_generator', 'load_weights', 'save_png']
