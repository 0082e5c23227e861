# A tiny generator (6 classes, patch 2 in pixel space) trained 2 steps on a few shapes at a
# high learning rate, so that its outputs are far from the zero-initialised ones; no EMA, no
# validation. Tests write child configs of it.
_base_ = [
    '../../configs/_base_/models/flexdit_pixel_tiny.py',
    '../../configs/_base_/datasets/shapes.py',
    '../../configs/_base_/schedules/adamw_constant.py',
    '../../configs/_base_/default_runtime.py',
]
model = dict(backbone=dict(hidden_size=32, depth=2, num_heads=2), sampler=dict(num_steps=4))
train_dataloader = dict(batch_size=4, dataset=dict(num_samples=64))
train_cfg = dict(max_iters=2)
val_dataloader, val_cfg, val_evaluator = None, None, None
optim_wrapper = dict(optimizer=dict(lr=0.05))
custom_hooks = []
default_hooks = dict(checkpoint=dict(interval=2), logger=dict(interval=1))
