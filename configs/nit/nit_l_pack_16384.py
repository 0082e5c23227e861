# NiT-L: 24 blocks of width 1024, 16 heads, 457.9M parameters (+ 8.9M projector); packs of
# 16384 tokens, REPA after block 6 with RADIO v2.5-H, lr 2.5e-5 (= 5e-5 x 2 GPUs / 4),
# 2M steps (reference: configs/c2i/nit_l_pack_merge_radio_16384.yaml, 2 GPUs). Data and
# paths: see nit_xl_pack_16384.py.
_base_ = ['./nit_xl_pack_16384.py']

model = dict(
    backbone=dict(hidden_size=1024, depth=24, num_heads=16),
    repa=dict(feature_block=6, projector_dim=2048))

optim_wrapper = dict(optimizer=dict(lr=2.5e-5))
