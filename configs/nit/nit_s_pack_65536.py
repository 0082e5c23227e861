# NiT-S: 12 blocks of width 384, 6 heads, 32.9M parameters (+ 1.5M projector); packs of
# 65536 tokens, REPA after block 4 with RADIO v2.5-B (768-d features; the config's choice,
# the README says v2.5-H), projector width 768, lr 1e-4 (= 5e-5 x 2 GPUs / 1), 2M steps
# (reference: configs/c2i/nit_s_pack_merge_radio_65536.yaml, 2 GPUs). Data and paths: see
# nit_xl_pack_16384.py (here the LPFHP_65536 sampler-meta file).
_base_ = ['./nit_b_pack_65536.py']

model = dict(
    backbone=dict(hidden_size=384, depth=12, num_heads=6),
    repa=dict(encoder=dict(checkpoint='checkpoints/radio-v2.5-b_half.pth.tar'),
              feature_block=4, projector_dim=768))
