# NiT's training recipe (projects/train/packed_trainer_c2i.py and its configs): AdamW with
# betas (0.9, 0.95), weight decay 0.01 on every parameter, eps 1e-6, constant learning
# rate without warm-up, gradient clipping at norm 1.0, bf16 autocast (fp32 weights), an EMA
# of the weights with decay 0.9999 from the first step (buffers not averaged), no validation
# during training. (Checkpoints every 2000 steps, keeping 2: the size configs, since
# default_hooks belongs to default_runtime.py.)
#
# Learning rate: the reference scales lr = 5e-5 x (packs per step) / base, base 4 (S and B:
# 1), with one pack per GPU. Each size config sets the value for its reference GPU count
# (XL, XXL: 8 GPUs -> 1e-4; S, B: 2 GPUs -> 1e-4; L: 2 GPUs -> 2.5e-5); on another count
# set optim_wrapper.optimizer.lr by that rule (mmengine's auto_scale_lr cannot read the
# batch size of a pack sampler).
optim_wrapper = dict(
    type='AutocastOptimWrapper', dtype='bfloat16',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-6),
    clip_grad=dict(max_norm=1.0))
param_scheduler = []

train_cfg = dict(type='FlexTrainLoop', max_iters=2_000_000, val_interval=2_000_000)
# Evaluation (FID-50K of generated samples) runs apart from training: tools/test.py.
val_cfg = None
test_cfg = dict(type='GenerationLoop')

# mmengine's momentum is 1 - decay.
custom_hooks = [dict(type='FlexEMAHook', momentum=1e-4, priority='ABOVE_NORMAL')]
