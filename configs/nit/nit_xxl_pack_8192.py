# NiT-XXL: 40 blocks of width 1536, 24 heads, AdaLN-LoRA of rank 512 in every block (each
# block its own SiLU -> Linear(D, 512) -> Linear(512, 6D)), 1362.7M parameters (+ 10.0M
# projector); packs of 8192 tokens, REPA after block 8 with RADIO v2.5-H, lr 1e-4
# (= 5e-5 x 8 GPUs / 4), 1M steps (reference: configs/c2i/nit_xxl_pack_merge_radio_8192.yaml,
# 8 GPUs). Data and paths: see nit_xl_pack_16384.py (here the LPFHP_8192 sampler-meta file).
_base_ = ['./nit_xl_pack_16384.py']

model = dict(
    backbone=dict(hidden_size=1536, depth=40, num_heads=24,
                  modulation=dict(type='AdaLNLoRA', rank=512)),
    repa=dict(feature_block=8, projector_dim=2048))

train_dataloader = dict(batch_sampler=dict(
    meta_file='data/imagenet1k/sampler_meta/'
              'dc-ae-f32c32-sana-1.1-diffusers_merge_LPFHP_8192.json',
    max_tokens=8192))

optim_wrapper = dict(optimizer=dict(lr=1e-4))
train_cfg = dict(max_iters=1_000_000, val_interval=1_000_000)
