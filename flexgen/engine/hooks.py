"""Hooks: sample previews during training, TF32 for the run, progress bars, the train
step's timer."""
import os.path as osp
import sys
import time
from contextlib import nullcontext

from mmengine.dist import is_main_process
from mmengine.hooks import EMAHook, Hook, IterTimerHook, RuntimeInfoHook
from mmengine.model import is_model_wrapper
from tqdm import tqdm

from flexgen.registry import HOOKS
from flexgen.utils.images import image_grid, save_png, to_uint8
from flexgen.utils.tf32 import set_tf32_flags, tf32_flags


@HOOKS.register_module()
class SamplePreviewHook(Hook):
    """Writes a grid of samples (one row per size, one column per class) to
    ``work_dir/previews/iter_<N>.png`` every ``interval`` iterations and at the end of
    training, from the EMA weights when an ``EMAHook`` or ``FlexEMAHook`` is present
    (with a sharded model every rank takes part and rank 0 samples), and hands the same grid
    to the runner's visualizer as image ``preview`` at step N (TensorBoard, when its backend
    is configured). Seeds are fixed, so successive grids show the same noise evolving into
    images."""

    priority = 'LOW'

    def __init__(self, sizes, classes=None, interval=1000, seed=0, out_dir='previews'):
        self.sizes = [tuple(s) for s in sizes]
        self.classes, self.interval, self.seed, self.out_dir = classes, interval, seed, out_dir

    def write(self, runner, step):
        ema = next((hook for hook in runner.hooks
                    if isinstance(hook, EMAHook) and hasattr(hook, 'ema_model')), None)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        # mmengine's EMA is a copy of the model; a FlexEMAHook's average is swapped into
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
                    self._sample(runner, model, step)
        finally:
            if in_place:
                ema._swap_ema_parameters()

    def _sample(self, runner, model, step):
        classes = self.classes if self.classes is not None else list(range(model.num_classes))
        labels = [c for _ in self.sizes for c in classes]
        sizes = [s for s in self.sizes for _ in classes]
        was_training = model.training
        model.eval()
        images = model.generate(labels, sizes, seeds=[self.seed + i for i in range(len(labels))])
        model.train(was_training)
        grid = image_grid([((im.float().cpu() + 1) / 2).clamp(0, 1) for im in images],
                          ncols=len(classes))
        path = osp.join(runner.work_dir, self.out_dir, f'iter_{step}.png')
        pixels = to_uint8(grid)
        save_png(pixels, path)
        # The PNG's pixels, [H, W, 3] as the visualizer takes them.
        runner.visualizer.add_image('preview', pixels.permute(1, 2, 0).numpy(), step=step)
        runner.logger.info(f'sample preview: {path}')

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.every_n_train_iters(runner, self.interval) and not self.is_last_train_iter(runner):
            self.write(runner, runner.iter + 1)

    def after_train(self, runner):
        self.write(runner, runner.iter)


@HOOKS.register_module()
class ProgressBarHook(Hook):
    """A progress bar (tqdm on stderr, main process only) over the batches of every
    validation and test run: generating the samples a metric scores takes minutes, and the
    logger prints only once they are scored. Closed after the last batch, before the
    metrics' own work (a judge trains with its own bar). A loop that shows its own
    progress (``reports_progress = True``, e.g. ``GenerationLoop``) gets no second bar."""

    priority = 'NORMAL'

    def __init__(self):
        self.bar = None

    def _before_epoch(self, runner, mode='train'):
        if mode == 'train' or not is_main_process():
            return
        loop = runner.val_loop if mode == 'val' else runner.test_loop
        if getattr(loop, 'reports_progress', False):
            return
        loader = runner.val_dataloader if mode == 'val' else runner.test_dataloader
        self.bar = tqdm(total=len(loader), desc=mode, unit='batch', file=sys.stderr,
                        dynamic_ncols=True)

    def _after_iter(self, runner, batch_idx, data_batch=None, outputs=None, mode='train'):
        if mode == 'train' or self.bar is None:
            return
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.close()

    def _after_epoch(self, runner, mode='train'):
        if mode != 'train':
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@HOOKS.register_module()
class TrainStepTimerHook(IterTimerHook):
    """mmengine's ``IterTimerHook`` whose training ``time`` and ``data_time`` count one
    training step alone: loading its batch and the step itself.

    mmengine's timer measures from the end of the previous iteration's timer call, so an
    iteration after a validation run also counts the evaluation, and every iteration
    counts the hooks that ran after the timer in the previous one (sample previews,
    checkpoints). Here the clock starts when the loop asks for the batch:
    :class:`flexgen.engine.FlexTrainLoop` calls :meth:`before_train_fetch` there. Under
    other loops it times as mmengine's does. Validation and test times are unchanged.
    """

    def before_train_fetch(self, runner):
        self.t = time.time()


@HOOKS.register_module()
class TF32Hook(Hook):
    """TensorFloat-32 for float32 matmuls and cuDNN convolutions on CUDA (Ampere and newer)
    while the Runner runs: training, validation, testing. DiT and SiT train with it on (DiT
    reports 0.81 vs 0.51 steps/s on 8 A100 with / without); it rounds the inputs of float32
    matmuls to 10 mantissa bits (bf16 / fp16 autocast matmuls, the CPU: unaffected).

    Sets ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
    to ``allow_tf32`` in ``before_run`` and puts the previous values back in ``after_run``,
    so a Runner leaves the process as it found it.

    Args:
        allow_tf32: the switch (``configs/_base_/default_runtime.py``: True).
    """

    priority = 'VERY_HIGH'

    def __init__(self, allow_tf32: bool = True):
        if not isinstance(allow_tf32, bool):
            raise ValueError(f'TF32Hook: allow_tf32 must be True or False, got {allow_tf32!r} '
                             '(default_hooks.tf32.allow_tf32)')
        self.allow_tf32, self._previous = allow_tf32, None

    def before_run(self, runner) -> None:
        try:
            self._previous = tf32_flags()
        except RuntimeError:  # torch refuses to read flags set through both of its APIs
            self._previous = None
        set_tf32_flags(self.allow_tf32, self.allow_tf32)

    def after_run(self, runner) -> None:
        if self._previous is not None:
            set_tf32_flags(*self._previous)
            self._previous = None


@HOOKS.register_module()
class FlexRuntimeInfoHook(RuntimeInfoHook):
    """mmengine's ``RuntimeInfoHook``, except that under ``FlexTrainLoop`` it leaves the
    training step's scalars to the loop, which logs them in step order at its flushes
    (reading them here would cost a device sync per step)."""

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if getattr(runner.train_loop, 'logs_step_scalars', False):
            return
        super().after_train_iter(runner, batch_idx, data_batch, outputs)
