# ImageNet for latent diffusion (DiT, SiT): ADM's square centre crop of every training image
# (ImageFolder resolution=...; half of the items mirrored), encoded to SD-VAE latents on the
# fly by the model's autoencoder (as DiT's / SiT's train.py do). Global batch 256 = 32 per
# GPU x 8 GPUs; on another GPU count set train_dataloader.batch_size to 256 / GPUs.
#
# Testing: FID-50K at the training resolution (imagenet_fid50k.py). No validation during
# training (sampling 50K images is a job of its own).
_base_ = ['./imagenet_fid50k.py']

_resolution = 256
_data_root = 'data/imagenet/train'

train_dataloader = dict(
    batch_size=32,
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    dataset=dict(type='ImageFolder', data_root=_data_root, resolution=_resolution,
                 hflip=True),
    sampler=dict(type='DefaultSampler', shuffle=False),  # order: the batch sampler's
    batch_sampler=dict(type='BucketBatchSampler'),      # shuffled; exact resume
    collate_fn=dict(type='flexgen.jagged_collate'))
