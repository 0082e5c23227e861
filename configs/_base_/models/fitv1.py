# FiT (Lu et al. 2024, "FiT: Flexible Vision Transformer for Diffusion Model"): a FlexDiT
# on SD-VAE latents of images at their own size and aspect ratio (up to 256 tokens), with
# 2-D axial RoPE instead of absolute positions (interleaved pairs, first half of every
# head rotating with the row, second with the column: layout 'fit'), SwiGLU MLPs of the
# full 4x width ('swiglu_large') and DiT's adaLN-Zero blocks; trained as DiT's DDPM
# (linear betas over 1000 steps, epsilon + learned variance range, IDDPM's hybrid loss).
# Sizes: configs/fit/.
#
# FiT pads every image to 256 tokens and masks; flexgen feeds the same images as a jagged
# batch (attention per image), which gives the same numbers: FiT's masked loss (mean
# over each image's valid tokens, then over images) is loss_reduction='image'.
# attn_backend='padded' computes attention FiT's own way (pad to the longest, mask).
# One difference, on purpose: the reference also sums the VLB term over padded tokens
# (its variance head learns from zero-padded positions); flexgen's loss sees real tokens only.
#
# Official weights (InfImagine/FiT, FiTv1_xl/model_ema.bin) load through the 'FiTv1'
# converter (tools/convert_checkpoint.py --from fitv1, flexgen.apis.official); the
# boundary below (model time 1000 t = the DDPM step) makes the outputs the reference's.
# The released FiT.forward embeds min(step, 1) (a bug: every step >= 1 looks alike); the
# converter reproduces it only when asked (clamp_time=True, FlexDiT time_max=1) for
# parity checks. Training and sampling here use the real step, as the weights were trained.
model = dict(
    type='DiffusionGenerator',
    backbone=dict(
        type='FlexDiT', in_channels=4, patch_size=2, hidden_size=1152, depth=28,
        num_heads=16, num_classes=1000, learn_sigma=True, mlp_ratio=4.0,
        block=dict(type='AdaLNZeroBlock'), mlp=dict(type='SwiGLUMlp', large=True),
        qk_norm=None, modulation=dict(type='AdaLNZero'), pos_embed=None,
        rope=dict(type='AxialRoPE2D', theta=10000.0, layout='fit'),
        attn_backend='auto',
        time_scale=1000.0, time_flip=False, output_scale=1.0),
    transport=dict(type='DDPM', num_timesteps=1000, beta_schedule='linear', prediction='eps',
                   variance='learned_range', loss='hybrid'),
    time_sampler=dict(type='DiscreteUniformTime', num_timesteps=1000),
    # sample_fit_ddp.py: 250 respaced ancestral steps (clip_denoised off), guidance 1.5 on
    # latent channels 0-2 only (DiT's reproducibility quirk, kept by FiT).
    sampler=dict(type='DDPMAncestral', num_steps='250', clip_denoised=False),
    guidance=dict(type='ClassifierFreeGuidance', scale=1.5, channels=(0, 1, 2)),
    # The training data are latents already (FiTLatents: SD-VAE-ft-EMA latents x 0.18215),
    # so training skips the encoder; generation decodes with that VAE (a local directory
    # written by diffusers' save_pretrained works offline).
    # SD-VAE: 4 latent channels, 8 px per latent pixel (known before the VAE loads, which
    # happens when something first encodes or decodes).
    autoencoder=dict(type='DiffusersAutoencoder', path='stabilityai/sd-vae-ft-ema',
                     latent_channels=4, downsample=8, scaling_factor=0.18215),
    inputs_are_latents=True,
    class_dropout_prob=0.1,
    loss_reduction='image')
