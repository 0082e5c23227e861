# Toy model, data and schedule for the engine tests (tests/toy_modules.py registers them;
# PYTHONPATH must hold tests/).
custom_imports = dict(imports=['toy_modules'], allow_failed_imports=False)

model = dict(type='ToyFlowModel', dim=8, hidden=32)

train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    dataset=dict(type='ToyVectorDataset', num=64, dim=8, seed=0),
    sampler=dict(type='DefaultSampler', shuffle=False),
    batch_sampler=dict(type='ToyStepBatchSampler'),
    collate_fn=dict(type='default_collate'))

train_cfg = dict(type='FlexTrainLoop', max_iters=8)
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.0))
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=4)]
custom_hooks = [dict(type='FlexEMAHook', momentum=0.1, priority='ABOVE_NORMAL')]

test_dataloader = dict(
    batch_size=16,
    num_workers=0,
    dataset=dict(type='ToyVectorDataset', num=32, dim=8, seed=0),
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'))
test_cfg = dict(type='TestLoop')
test_evaluator = dict(type='ToyLossMetric')
