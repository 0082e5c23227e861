# The embedded demo data: procedurally drawn shapes (the class is the shape, grey levels are
# random) at several resolutions and aspect ratios, generated from a seed, no download.
# palette='rgb' draws random colours instead: a tiny model needs about 3x the steps for them.
_sizes = [(16, 16), (24, 24), (16, 24), (24, 16), (32, 16), (16, 32)]
_shapes = dict(type='ProceduralShapes', num_samples=30_000, sizes=_sizes, seed=0,
               palette='grey')
_requests = dict(type='GenerationRequests', num_classes=6, sizes=_sizes, num_per_class=8,
                 seed=1)

train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    dataset=_shapes,
    sampler=dict(type='DefaultSampler', shuffle=False),  # order: the batch sampler's
    batch_sampler=dict(type='BucketBatchSampler'),      # one size per step
    collate_fn=dict(type='flexgen.jagged_collate'))

# Validation and test generate images for requested (class, size) pairs and score them.
val_dataloader = dict(
    batch_size=48,
    num_workers=0,
    dataset=_requests,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='flexgen.jagged_collate'))
test_dataloader = val_dataloader

# A small CNN trained once on the real shapes (cached) judges the generated ones; trained
# with noise so that it reads a sample's shape, not its residual grain.
val_evaluator = dict(type='GeneratedClassAccuracy', classifier_dataset=_shapes,
                     train_cfg=dict(noise_std=0.2))
test_evaluator = val_evaluator
