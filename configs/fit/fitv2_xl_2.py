# FiTv2-XL/2 (Wang et al. 2024): 36 blocks of width 1152, 16 heads, patch 2, AdaLN-LoRA of
# rank 288 + global adaLN, QK-norm, SwiGLU of width 3072: 671,045,776 parameters (README:
# 671M, 147 GFLOPs). ImageNet latents up to 256 tokens, larger images as the aspect-kept
# resize or the square crop with probability 1/2 each (FiTv2's mix of flexible and fixed
# resolution), rectified flow with logit-normal t, AdamW lr 1e-4 at global batch 256
# (scaled by batch / 256), no weight decay, linear warm-up over 50K steps from 1e-4 of
# the lr, then constant, gradient clipping at 1.0, EMA 0.9999, bf16 autocast, 2M steps
# (reference: configs/fitv2/config_fitv2_xl.yaml). The reference's accelerate scheduler
# advanced its warm-up once per process per step, so its runs finished warming up after
# 50K / (number of GPUs) steps; this config warms up over 50K steps, as configured.
#
#   python tools/train.py configs/fit/fitv2_xl_2.py --amp --launcher pytorch   # 16 GPUs
#   python tools/sample.py configs/fit/fitv2_xl_2.py FiTv2_XL/model_ema.safetensors \
#       --classes 207 360 --height 256 --width 256 --cfg-scale 1.5
# The README's extrapolation recipes (ori_max_pe_len 16, one scale per axis):
#   160 x 320: NTK-aware:
#     --cfg-options "model.backbone.rope.rule=dict(type='NTKAware',ori_max_pe_len=16,decouple=True)"
#   320 x 320: NTK-aware + proportional attention ("ntkpro2"):
#     --cfg-options "model.backbone.rope.rule=dict(type='NTKPro2',ori_max_pe_len=16,decouple=True)"
_base_ = [
    '../_base_/models/fitv2.py',
    '../_base_/datasets/fit_latents.py',
    '../_base_/schedules/adamw_constant.py',
    '../_base_/default_runtime.py',
]

# The reference config: 16 per GPU (global 256 on 16 GPUs, the README's batch).
train_dataloader = dict(batch_size=16, dataset=dict(choice='random'))

optim_wrapper = dict(clip_grad=dict(max_norm=1.0))
# diffusers' constant_with_warmup: factor 1e-4 + (1 - 1e-4) step / 50K, then 1.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-4, end_factor=1.0, by_epoch=False, begin=0,
         end=50_000),
]
train_cfg = dict(max_iters=2_000_000, val_interval=2_000_000)
# The reference saves every 4K steps (keeping 2) and at 200K, 400K, 1M, 1.4M, 1.5M, 1.8M.
default_hooks = dict(checkpoint=dict(interval=4_000, max_keep_ckpts=2))
auto_scale_lr = dict(base_batch_size=256, enable=True)

val_cfg = None  # no validation during training: FID-50K sampling is tools/test.py's job
