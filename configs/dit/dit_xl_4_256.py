# DiT-XL/4 at 256x256: 28 blocks of width 1152, 16 heads, patch 4 (64 tokens
# of a 32x32 latent), 675,000,704 trainable parameters. The paper trains every size for 400K steps
# (batch 256, AdamW lr 1e-4, EMA 0.9999) to compare them (Peebles & Xie 2023, Table 4).
_base_ = './dit_xl_2_256.py'

model = dict(backbone=dict(patch_size=4, hidden_size=1152, depth=28, num_heads=16))
train_cfg = dict(max_iters=400_000)
