# The demo's model and data at a size that trains in seconds, with an EMA momentum that
# keeps the EMA weights far from the raw ones after a few steps (tests of which weights
# each reader loads).
_base_ = ['../../configs/demo/shapes_flexdit_rf.py']

model = dict(backbone=dict(hidden_size=32, depth=2, num_heads=2),
             sampler=dict(num_steps=4))
train_dataloader = dict(batch_size=4, dataset=dict(num_samples=64))
train_cfg = dict(max_iters=4, val_interval=1000)
param_scheduler = []
val_dataloader = None
val_cfg = None
val_evaluator = None
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2, max_keep_ckpts=-1))
custom_hooks = [dict(type='FlexEMAHook', momentum=0.5, priority='ABOVE_NORMAL')]
