# DiT-XL/2 at 256x256 (Peebles & Xie 2023): 28 blocks of width 1152, 16 heads, patch 2
# (256 tokens of a 32x32 SD-VAE latent), 674,834,720 trainable parameters (the
# reference's 675,129,632 counts its frozen pos_embed table, 256 x 1152 = 294,912, which
# flexgen computes instead of storing). Trained 7M steps (1400 epochs) at batch 256 with
# AdamW lr 1e-4, no weight decay, EMA 0.9999: FID-50K 2.27 with guidance 1.5.
#
#   python tools/train.py configs/dit/dit_xl_2_256.py --launcher pytorch   # 8 GPUs
#   python tools/sample.py configs/dit/dit_xl_2_256.py DiT-XL-2-256x256.pt \
#       --classes 207 360 387 974 --height 256 --width 256 --cfg-scale 4.0
_base_ = [
    '../_base_/models/dit.py',
    '../_base_/datasets/imagenet_latents.py',
    '../_base_/schedules/adamw_constant.py',
    '../_base_/default_runtime.py',
]

model = dict(backbone=dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16))

train_cfg = dict(max_iters=7_000_000)
# DiT's train.py saves every 50K steps.
default_hooks = dict(checkpoint=dict(interval=50_000))
# Global batch 256 (train_dataloader.batch_size x GPUs); --cfg-options
# auto_scale_lr.enable=True scales lr linearly for another global batch.
auto_scale_lr = dict(base_batch_size=256, enable=False)

val_cfg = None  # no validation during training: FID-50K sampling is tools/test.py's job
