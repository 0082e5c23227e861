# ImageNet for latent diffusion (DiT, SiT): ADM's square centre crop of every training image
# (ImageFolder resolution=...; half of the items mirrored), encoded to SD-VAE latents on the
# fly by the model's autoencoder (as DiT's / SiT's train.py do). Global batch 256 = 32 per
# GPU x 8 GPUs; on another GPU count set train_dataloader.batch_size to 256 / GPUs.
#
# Generation requests for FID-50K: 50 images per class at the training resolution (the
# evaluation protocol of DiT / SiT: 50,000 samples, compared with ADM's ImageNet
# reference batch). tools/test.py (GenerationLoop) generates them in resumable shards,
# writes samples_256x256.npz for ADM's evaluation suite and scores them in-process with
# ADM's Inception (torch-fidelity's port): FID, sFID, IS, precision / recall against the
# reference batch (VIRTUAL_imagenet256_labeled.npz from guided-diffusion's evaluations;
# the Inception weights: inception_weights=PATH, or fetched once into torch's hub cache).
# No validation during training (sampling 50K images is a job of its own).
_resolution = 256
_data_root = 'data/imagenet/train'

train_dataloader = dict(
    batch_size=32,
    num_workers=8,
    persistent_workers=True,
    dataset=dict(type='ImageFolder', data_root=_data_root, resolution=_resolution,
                 hflip=True),
    sampler=dict(type='DefaultSampler', shuffle=False),  # order: the batch sampler's
    batch_sampler=dict(type='BucketBatchSampler'),      # shuffled; exact resume
    collate_fn=dict(type='flexgen.jagged_collate'))

test_dataloader = dict(
    batch_size=32,
    num_workers=2,
    dataset=dict(type='GenerationRequests', num_classes=1000,
                 sizes=[(_resolution, _resolution)], num_per_class=50, seed=0),
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='flexgen.jagged_collate'))
test_evaluator = dict(type='InceptionMetrics',
                      reference='data/adm_reference/VIRTUAL_imagenet256_labeled.npz')
