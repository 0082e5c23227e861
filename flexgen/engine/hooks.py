"""Hooks: sample previews during training."""
import os.path as osp


from mmengine.dist import master_only
from mmengine.hooks import EMAHook, Hook
from mmengine.model import is_model_wrapper

from flexgen.registry import HOOKS


@HOOKS.register_module()
class SamplePreviewHook(Hook):
    """Writes a grid of samples (one row per size, one column per class) to
    ``work_dir/previews/iter_<N>.png`` every ``interval`` iterations and at the end of
    training, from the EMA weights when an ``EMAHook`` is present. Seeds are fixed, so
    successive grids show the same noise evolving into images."""

    priority = 'LOW'

    def __init__(self, sizes, classes=None, interval=1000, seed=0, out_dir='previews'):
        self.sizes = [tuple(s) for s in sizes]
        self.classes, self.interval, self.seed, self.out_dir = classes, interval, seed, out_dir

    def _model(self, runner):
        for hook in runner.hooks:
            if isinstance(hook, EMAHook) and hasattr(hook, 'ema_model'):
                return hook.ema_model.module
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    @master_only
    def write(self, runner, name):
        from flexgen.apis.inference import image_grid, save_png
        model = self._model(runner)
        classes = self.classes if self.classes is not None else list(range(model.num_classes))
        labels = [c for _ in self.sizes for c in classes]
        sizes = [s for s in self.sizes for _ in classes]
        was_training = model.training
        model.eval()
        images = model.generate(labels, sizes, seeds=[self.seed + i for i in range(len(labels))])
        model.train(was_training)
        grid = image_grid([((im.float().cpu() + 1) / 2).clamp(0, 1) for im in images],
                          ncols=len(classes))
        path = osp.join(runner.work_dir, self.out_dir, f'{name}.png')
        save_png(grid, path)
        runner.logger.info(f'sample preview: {path}')

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.every_n_train_iters(runner, self.interval) and not self.is_last_train_iter(runner):
            self.write(runner, f'iter_{runner.iter + 1}')

    def after_train(self, runner):
        self.write(runner, f'iter_{runner.iter}')
