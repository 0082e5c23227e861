"""The training step of the tiny packed config (NiT's recipe on the demo shapes: packs,
RoPE, QK-norm, direction loss, EMA, gradient clipping) makes no host-device sync: none in
forward + backward + optimizer step, and the engine's own (logging, checks) only at its
flushes. Counted on CPU by flexgen.utils.HostSyncCounter, which tracks which tensors
would live on the GPU (tools/gpu_check.py counts the real ones with CUDA's sync debug
mode)."""
import os.path as osp
import uuid

import torch
from mmengine.hooks import Hook

import flexgen
from flexgen.models.data_preprocessor import FlexDataPreprocessor
from flexgen.utils.host_sync import HostSyncCounter
from helpers import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'nit', 'nit_tiny_shapes_pack.py')
STEPS, LOG_EVERY = 9, 4


class CountFrom(Hook):
    """Counts from the second iteration on (the first builds optimizer state)."""

    def __init__(self, counter):
        self.counter = counter

    def before_train_fetch(self, runner):
        # Loading and collating run on the host (in workers on a GPU machine; here in
        # this process, where "cpu" is also the model's device): not counted.
        self.counter.phase = 'data'

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter == 1:
            self.counter.mark(runner.model)
            for hook in runner.hooks:  # modules hooks keep on the device (the EMA)
                self.counter.mark(*[v for v in vars(hook).values()
                                    if isinstance(v, torch.nn.Module)])
            self.counter.__enter__()
        self.counter.phase = 'engine'

    def after_train(self, runner):
        self.counter.__exit__(None, None, None)


def test_tiny_packed_training_step_makes_no_host_sync(monkeypatch):
    flexgen.register_all_modules()
    torch.set_num_threads(1)
    runner = load_tool('train').build_runner([
        CONFIG, '--work-dir', f'/tmp/flexgen_syncs_{uuid.uuid4().hex[:8]}', '--cfg-options',
        'model.backbone.hidden_size=32', 'model.backbone.depth=2',
        'model.backbone.num_heads=2', 'train_dataloader.dataset.num_samples=400',
        'train_dataloader.batch_sampler.max_tokens=512', f'train_cfg.max_iters={STEPS}',
        f'default_hooks.logger.interval={LOG_EVERY}', 'default_hooks.checkpoint.interval=1000',
        'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
        f'experiment_name=syncs_{uuid.uuid4().hex[:8]}'])
    counter = HostSyncCounter('cpu')
    runner.register_hook(CountFrom(counter), priority='VERY_HIGH')

    real_train_step, real_preprocess = runner.model.train_step, FlexDataPreprocessor.forward
    real_save = runner.save_checkpoint

    def save_checkpoint(*args, **kwargs):  # copying the weights out syncs, once per save
        counter.phase = 'checkpoint'
        try:
            return real_save(*args, **kwargs)
        finally:
            counter.phase = 'engine'

    def train_step(*args, **kwargs):
        counter.phase = 'step'
        try:
            return real_train_step(*args, **kwargs)
        finally:
            counter.phase = 'engine'

    def preprocess(self, data, training=False):
        data = real_preprocess(self, data, training)
        geometry = data['inputs'].geometry  # moved with the batch (kept as is on a CPU)
        counter.mark(geometry.tensors, geometry.plans)
        return data

    monkeypatch.setattr(runner.model, 'train_step', train_step)
    monkeypatch.setattr(runner, 'save_checkpoint', save_checkpoint)
    monkeypatch.setattr(FlexDataPreprocessor, 'forward', preprocess)
    runner.train()

    assert type(runner.model.data_preprocessor) is FlexDataPreprocessor
    assert runner.message_hub.get_scalar('train/loss').data[0].size == STEPS
    events = counter.events
    assert not events['step'], '\n'.join(events['step'][:3])
    # The engine reads the steps' scalars once per flush: iterations 4 and 8 (logger) and
    # 9 (the last), counted from iteration 2.
    flushes = len({4, 8, STEPS})
    assert len(events['engine']) <= flushes, '\n'.join(events['engine'][:4])
