# DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): a FlexDiT with
# DiT's blocks (adaLN-Zero, GELU-tanh MLP, fixed 2-D sin-cos positions) on SD-VAE latents
# (4 x H/8 x W/8, scale 0.18215), trained as a DDPM (linear betas 1e-4..0.02 over 1000
# steps) predicting epsilon and the learned variance range, with IDDPM's hybrid loss
# (L_simple + the VLB term, which trains only the variance). Sizes: configs/dit/.
#
# Official checkpoints (DiT-XL-2-256x256.pt, ...) load directly: tools/sample.py and
# tools/test.py convert them on the fly, or flexgen.apis.official.load_official(config,
# checkpoint); the boundary below (model time = 1000 t, the DDPM step) makes the outputs
# those of the reference.
model = dict(
    type='DiffusionGenerator',
    backbone=dict(
        type='FlexDiT', in_channels=4, patch_size=2, hidden_size=1152, depth=28,
        num_heads=16, num_classes=1000, learn_sigma=True, mlp_ratio=4.0,
        block=dict(type='AdaLNZeroBlock'), mlp=dict(type='GeluMlp'),
        pos_embed=dict(type='SinCos2D'), rope=None,
        time_scale=1000.0, time_flip=False, output_scale=1.0),
    transport=dict(type='DDPM', beta_schedule='linear', num_timesteps=1000, prediction='eps',
                   variance='learned_range', loss='hybrid'),
    time_sampler=dict(type='DiscreteUniformTime', num_timesteps=1000),
    # DiT's sample_ddp.py: 250 respaced ancestral steps, guidance 1.5 (FID-50K 2.27);
    # sample.py uses 4.0 for pictures. DiT guides only latent channels 0-2 (a GLIDE
    # leftover kept for reproducibility, DiT issue #41); channels=None guides all four.
    sampler=dict(type='DDPMAncestral', num_steps='250'),
    guidance=dict(type='ClassifierFreeGuidance', scale=1.5, channels=(0, 1, 2)),
    # DiT trains with sd-vae-ft-ema, sampling a posterior latent; sample_ddp.py decodes
    # with the same VAE (sample.py defaults to sd-vae-ft-mse). A local directory written
    # by diffusers' save_pretrained works offline.
    # SD-VAE: 4 latent channels, 8 px per latent pixel (known before the VAE loads, which
    # happens when something first encodes or decodes).
    autoencoder=dict(type='DiffusersAutoencoder', path='stabilityai/sd-vae-ft-ema',
                     latent_channels=4, downsample=8, scaling_factor=0.18215,
                     sample_posterior=True),
    class_dropout_prob=0.1,
    loss_reduction='image')
