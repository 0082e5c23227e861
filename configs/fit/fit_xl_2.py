# FiT-XL/2 (FiTv1; Lu et al. 2024): 28 blocks of width 1152, 16 heads, patch 2, SwiGLU of
# width 4608, 823,599,392 parameters (README: 824M, 153 GFLOPs). ImageNet at native aspect
# ratios up to 256 tokens (256 x 256 pixels of area; FiT's pre-encoded latents, the aspect-
# kept "resize" copy of larger images), batch 256 = 32 x 8 GPUs, AdamW lr 1e-4 (scaled by
# global batch / 256), no weight decay, constant lr, gradient clipping at 1.0, EMA 0.9999,
# bf16 autocast (tools/train.py --amp), 2M steps (reference: configs/fit/config_fit_xl.yaml).
#
#   python tools/train.py configs/fit/fit_xl_2.py --amp --launcher pytorch   # 8 GPUs
#   python tools/sample.py configs/fit/fit_xl_2.py FiTv1_xl/model_ema.bin \
#       --classes 207 360 --height 256 --width 256 --cfg-scale 1.5
# Sampling beyond 256 x 256 (FiT's extrapolation recipes, sample_fit_ddp.py: no, linear,
# yarn, dynntk, partntk, with ori_max_pe_len 16), e.g. NTK-aware with one scale per axis:
#   --cfg-options "model.backbone.rope.rule=dict(type='NTKAware',ori_max_pe_len=16,decouple=True)"
_base_ = [
    '../_base_/models/fitv1.py',
    '../_base_/schedules/adamw_constant.py',
    '../_base_/default_runtime.py',
]

_target_len = 256  # FiT's context: the most tokens one image may hold
# InfImagine/imagenet1k_features_256_sd_vae_ft_ema, extracted
_data_root = 'data/imagenet1k_latents_256_sd_vae_ft_ema'

train_dataloader = dict(
    batch_size=32,
    num_workers=2,
    persistent_workers=True,
    dataset=dict(type='FiTLatents', data_root=_data_root, target_len=_target_len,
                 choice='resize', flip_prob=0.5),
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='flexgen.padded_collate', max_length=_target_len, patch_size=2))

# FID-50K requests: 50 images per class at 256 x 256.
test_dataloader = dict(
    batch_size=32,
    num_workers=2,
    dataset=dict(type='GenerationRequests', num_classes=1000, sizes=[(256, 256)],
                 num_per_class=50, seed=0),
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='flexgen.jagged_collate'))

optim_wrapper = dict(clip_grad=dict(max_norm=1.0))
train_cfg = dict(max_iters=2_000_000, val_interval=2_000_000)
# The reference saves every 100K steps (keeping 2) and at 400K, 1M and 2M.
default_hooks = dict(checkpoint=dict(interval=100_000, max_keep_ckpts=2))
# --scale_lr: lr = 1e-4 x global batch / 256.
auto_scale_lr = dict(base_batch_size=256, enable=True)

# tools/test.py writes the samples (PNGs + samples.npz for ADM's FID suite); no validation
# during training.
test_evaluator = dict(type='SampleWriter', out_dir='work_dirs/samples')
val_cfg = None
