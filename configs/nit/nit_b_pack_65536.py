# NiT-B: 12 blocks of width 768, 12 heads, 130.3M parameters (+ 8.4M projector); packs of
# 65536 tokens, REPA after block 4 with RADIO v2.5-H, lr 1e-4 (= 5e-5 x 2 GPUs / 1), 2M
# steps (reference: configs/c2i/nit_b_pack_merge_radio_65536.yaml, 2 GPUs). Data and
# paths: see nit_xl_pack_16384.py (here the LPFHP_65536 sampler-meta file).
_base_ = ['./nit_xl_pack_16384.py']

model = dict(
    backbone=dict(hidden_size=768, depth=12, num_heads=12),
    repa=dict(feature_block=4, projector_dim=2048))

train_dataloader = dict(batch_sampler=dict(
    meta_file='data/imagenet1k/sampler_meta/'
              'dc-ae-f32c32-sana-1.1-diffusers_merge_LPFHP_65536.json',
    max_tokens=65536))

optim_wrapper = dict(optimizer=dict(lr=1e-4))
