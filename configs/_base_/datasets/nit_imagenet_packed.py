# NiT's training data: ImageNet-1K pre-encoded to DC-AE f32c32 latents in three geometries
# merged into one set (native resolution, ADM centre crops at 256 and 512: ~3.84M items;
# the Hugging Face set GoodEnough/NiT-Preprocessed-ImageNet1K, or tools/encode_latents.py
# --format nit), each with its original image for REPA, served as LPFHP packs of a fixed
# token budget (tools/pack_dataset.py, or NiT's released sampler-meta files). One pack per
# GPU and step; packs are reshuffled every epoch (seed + epoch) and dealt out to the ranks.
#
# Paths follow the NiT README's layout under data/imagenet1k/. Set them with
#   --cfg-options train_dataloader.dataset.data_meta=... \
#                 train_dataloader.dataset.latent_dirs="[...,...,...]" \
#                 train_dataloader.dataset.image_dir=/path/to/imagenet/train \
#                 train_dataloader.batch_sampler.meta_file=...
# A missing file stops the build with an error naming it; image_dir (REPA's original
# images) has no default and must be given.
_base_ = ['./imagenet_fid50k.py']

_root = 'data/imagenet1k'
_vae = 'dc-ae-f32c32-sana-1.1-diffusers'
_types = ['native-resolution', 'fixed-256x256', 'fixed-512x512']

train_dataloader = dict(
    batch_size=1,  # packs per GPU and step
    num_workers=4,
    persistent_workers=True,
    pin_memory=True,
    dataset=dict(
        type='NiTLatents',
        data_meta=f'{_root}/data_meta/{_vae}_merge_meta.jsonl',
        data_types=_types,
        latent_dirs=[f'{_root}/{_vae}-native-resolution', f'{_root}/{_vae}-256x256',
                     f'{_root}/{_vae}-512x512'],
        image_dir=None,
        image_mode='image', image_scale=16,  # RADIO/16 sees one patch per latent cell
        flip_prob=0.5, latent_channels=32),
    sampler=dict(type='DefaultSampler', shuffle=False),  # order: the pack sampler's
    batch_sampler=dict(
        type='OfflinePackSampler',
        meta_file=f'{_root}/sampler_meta/{_vae}_merge_LPFHP_16384.json',
        max_tokens=16384, patch_size=1),
    # patchified and its geometry built in the workers; the REPA images grouped per size
    collate_fn=dict(type='flexgen.jagged_collate', patch_size=1))

# Testing: FID-50K (imagenet_fid50k.py) at 256 x 256; tools/test.py --sizes / --cfg-scale /
# --sampler give the other resolutions' settings (README, "Reproducing the papers' numbers").
# 256 x 256 is compared with ADM's 256 x 256 reference batch, every other size with the
# 512 x 512 one (NiT's README does not say which reference its other resolutions used).
test_evaluator = dict(reference={
    '_delete_': True,
    '256x256': 'data/adm_reference/VIRTUAL_imagenet256_labeled.npz',
    'default': 'data/adm_reference/VIRTUAL_imagenet512.npz'})
