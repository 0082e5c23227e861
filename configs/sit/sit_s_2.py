# SiT-S/2 (Ma et al. 2024): DiT-S/2's network (12 blocks of width 384, 6 heads,
# patch 2, 32,865,056 trainable parameters) trained on the Linear interpolant
# with velocity prediction, batch 256, AdamW lr 1e-4, no weight decay, EMA 0.9999.
# 400K steps, the length of the paper's size comparisons.
_base_ = './sit_xl_2.py'

model = dict(backbone=dict(patch_size=2, hidden_size=384, depth=12, num_heads=6))
train_cfg = dict(max_iters=400_000)
