# DiT-S/8 at 256x256: 12 blocks of width 384, 6 heads, patch 8 (16 tokens
# of a 32x32 latent). The paper trains every size for 400K steps
# (batch 256, AdamW lr 1e-4, EMA 0.9999) to compare them (Peebles & Xie 2023, Table 4).
_base_ = './dit_xl_2_256.py'

model = dict(backbone=dict(patch_size=8, hidden_size=384, depth=12, num_heads=6))
train_cfg = dict(max_iters=400_000)
