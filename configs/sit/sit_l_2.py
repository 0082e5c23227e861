# SiT-L/2 (Ma et al. 2024): DiT-L/2's network (24 blocks of width 1024, 16 heads,
# patch 2, 457,840,672 trainable parameters) trained on the Linear interpolant
# with velocity prediction, batch 256, AdamW lr 1e-4, no weight decay, EMA 0.9999.
# 400K steps, the length of the paper's size comparisons.
_base_ = './sit_xl_2.py'

model = dict(backbone=dict(patch_size=2, hidden_size=1024, depth=24, num_heads=16))
train_cfg = dict(max_iters=400_000)
