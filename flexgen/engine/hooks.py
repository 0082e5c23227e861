"""Hooks: sample previews during training."""
import os.path as osp
from contextlib import nullcontext

from mmengine.dist import is_main_process
from mmengine.hooks import EMAHook, Hook
from mmengine.model import is_model_wrapper

from flexgen.apis.inference import image_grid, save_png
from flexgen.registry import HOOKS


@HOOKS.register_module()
class SamplePreviewHook(Hook):
    """Writes a grid of samples (one row per size, one column per class) to
    ``work_dir/previews/iter_<N>.png`` every ``interval`` iterations and at the end of
    training, from the EMA weights when an ``EMAHook`` or ``ShardedEMAHook`` is present
    (with a sharded model every rank takes part and rank 0 samples). Seeds are fixed, so
    successive grids show the same noise evolving into images."""

    priority = 'LOW'

    def __init__(self, sizes, classes=None, interval=1000, seed=0, out_dir='previews'):
        self.sizes = [tuple(s) for s in sizes]
        self.classes, self.interval, self.seed, self.out_dir = classes, interval, seed, out_dir

    def write(self, runner, name):
        ema = next((hook for hook in runner.hooks
                    if isinstance(hook, EMAHook) and hasattr(hook, 'ema_model')), None)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        # mmengine's EMA is a copy of the model; a ShardedEMAHook's average is swapped into
        # the model itself (on every rank), and a sharded model gathers its weights (a
        # collective: every rank takes part, rank 0 samples).
        in_place = ema is not None and not hasattr(ema.ema_model, 'module')
        if ema is not None and not in_place:
            model = ema.ema_model.module
        if in_place:
            ema._swap_ema_parameters()
        try:
            with (runner.model.gathered() if hasattr(runner.model, 'gathered')
                  else nullcontext()):
                if is_main_process():
                    self._sample(runner, model, name)
        finally:
            if in_place:
                ema._swap_ema_parameters()

    def _sample(self, runner, model, name):
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
