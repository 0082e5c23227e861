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
    '../_base_/datasets/fit_latents.py',
    '../_base_/schedules/adamw_constant.py',
    '../_base_/default_runtime.py',
]

optim_wrapper = dict(clip_grad=dict(max_norm=1.0))
train_cfg = dict(max_iters=2_000_000, val_interval=2_000_000)
# The reference saves every 100K steps (keeping 2) and at 400K, 1M and 2M.
default_hooks = dict(checkpoint=dict(interval=100_000, max_keep_ckpts=2))
# --scale_lr: lr = 1e-4 x global batch / 256.
auto_scale_lr = dict(base_batch_size=256, enable=True)

val_cfg = None  # no validation during training: FID-50K sampling is tools/test.py's job
