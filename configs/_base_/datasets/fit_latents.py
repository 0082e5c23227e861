# FiT's ImageNet latents (the FiT folder format, read by FiTLatents): every image at most
# 256 tokens of patch-2 SD-VAE latents (jagged_collate's max_length: FiT's context length;
# FiT pads to it, here the model gets the jagged batch and the loss is per image).
# FiTv1 uses the resized copy of large images; FiTv2 picks the resized or the cropped one
# at random (choice='random').
#
# Testing: FID-50K at 256 x 256 (imagenet_fid50k.py).
_base_ = ['./imagenet_fid50k.py']

_target_len = 256  # FiT's context: the most tokens one image may hold
# InfImagine/imagenet1k_features_256_sd_vae_ft_ema, extracted
_data_root = 'data/imagenet1k_latents_256_sd_vae_ft_ema'

train_dataloader = dict(
    batch_size=32,
    num_workers=2,
    persistent_workers=True,
    pin_memory=True,
    dataset=dict(type='FiTLatents', data_root=_data_root, target_len=_target_len,
                 choice='resize', flip_prob=0.5),
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='flexgen.jagged_collate', patch_size=2, max_length=_target_len))
