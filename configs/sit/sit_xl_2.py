# SiT-XL/2 (Ma et al. 2024): DiT-XL/2's network (28 blocks of width 1152, 16 heads,
# patch 2, 674,834,720 trainable parameters) trained on the Linear interpolant
# with velocity prediction, batch 256, AdamW lr 1e-4, no weight decay, EMA 0.9999.
# 7M steps: FID-50K 2.06 with guidance 1.5 and the SDE sampler (sit_xl_2_sde.py); this
# config samples with SiT's default ODE (dopri5).
#
#   python tools/train.py configs/sit/sit_xl_2.py --launcher pytorch   # 8 GPUs
#   python tools/sample.py configs/sit/sit_xl_2.py SiT-XL-2-256.pt \
#       --classes 207 360 387 974 --height 256 --width 256 --cfg-scale 4.0
_base_ = [
    '../_base_/models/sit.py',
    '../_base_/datasets/imagenet_latents.py',
    '../_base_/schedules/adamw_constant.py',
    '../_base_/default_runtime.py',
]

model = dict(backbone=dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16))

train_cfg = dict(max_iters=7_000_000)
default_hooks = dict(checkpoint=dict(interval=50_000))
auto_scale_lr = dict(base_batch_size=256, enable=False)

val_cfg = None  # no validation during training: FID-50K sampling is tools/test.py's job
