# AdamW at a constant learning rate with an EMA of the weights: the recipe of DiT / SiT
# (lr 1e-4, no weight decay, betas (0.9, 0.999), EMA decay 0.9999, global batch 256).
optim_wrapper = dict(
    type='FlexOptimWrapper',  # mmengine's, without a host sync per step
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8))
param_scheduler = []

train_cfg = dict(type='FlexTrainLoop', max_iters=400_000, val_interval=50_000)
val_cfg = dict(type='ValLoop')
# Generators are tested by generating their requests (GenerationLoop: sharded, resumable,
# ADM's .npz and a per-size table); see tools/test.py.
test_cfg = dict(type='GenerationLoop')

# mmengine's momentum is 1 - decay: averaged = (1 - m) * averaged + m * current.
custom_hooks = [dict(type='FlexEMAHook', momentum=1e-4, priority='ABOVE_NORMAL')]
