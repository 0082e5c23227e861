# NiT-XL (Wang et al. 2025): 28 blocks of width 1152, 16 heads (head dim 72), patch 1 on
# DC-AE f32c32 latents: 674.9M parameters (+ 9.1M of the REPA projector). Packs of 16384
# tokens, one per GPU and step (~93 images of ImageNet's three merged geometries), REPA
# after block 8 with RADIO v2.5-H (1280-d), lr 1e-4 (= 5e-5 x 8 GPUs / 4), 2M steps
# (the reference: configs/c2i/nit_xl_pack_merge_radio_16384.yaml, 8 GPUs). FID-50K of
# the released 1000K-step EMA weights: 2.16 at 256 px, 1.57 at 512 px.
#
#   python tools/train.py configs/nit/nit_xl_pack_16384.py --launcher pytorch
#   torchrun --nproc_per_node 8 tools/train.py configs/nit/nit_xl_pack_16384.py \
#       --launcher pytorch --cfg-options train_dataloader.dataset.image_dir=IMAGENET/train
#
# Needs (paths in configs/_base_/datasets/nit_imagenet_packed.py, each a config field):
# the merged data-meta jsonl and the three latent folders, ImageNet's train images (REPA),
# the LPFHP_16384 sampler-meta file (tools/pack_dataset.py --max-seq-len 16384) and the
# RADIO checkpoint (model.repa.encoder.checkpoint). Sampling the official weights:
# configs/nit/nit_xl_official.py.
_base_ = [
    '../_base_/models/nit.py',
    '../_base_/datasets/nit_imagenet_packed.py',
    '../_base_/schedules/nit.py',
    '../_base_/default_runtime.py',
]

model = dict(
    backbone=dict(hidden_size=1152, depth=28, num_heads=16),
    repa=dict(feature_block=8, projector_dim=2048))

train_dataloader = dict(batch_sampler=dict(
    meta_file='data/imagenet1k/sampler_meta/'
              'dc-ae-f32c32-sana-1.1-diffusers_merge_LPFHP_16384.json',
    max_tokens=16384))

optim_wrapper = dict(optimizer=dict(lr=1e-4))
train_cfg = dict(max_iters=2_000_000, val_interval=2_000_000)
# The reference saves every 2000 steps keeping the last 2 (plus permanent copies at 100K,
# 150K, 200K and 500K steps).
default_hooks = dict(checkpoint=dict(interval=2000, max_keep_ckpts=2))
