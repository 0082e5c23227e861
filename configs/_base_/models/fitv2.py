# FiTv2 (Wang et al. 2024, "FiTv2: Scalable and Improved Flexible Vision Transformer for
# Diffusion Model"): FiT's flexible-resolution FlexDiT with QK-norm (LayerNorm without
# affine over each head, before RoPE), AdaLN-LoRA (per block SiLU -> Linear(D, r) ->
# Linear(r, 6D), r = D/4) plus one global adaLN (SiLU -> Linear(D, 6D), computed once and
# added to every block's modulation), SwiGLU MLPs of 2/3 of the 4x width, no learned
# variance; trained as rectified flow (linear interpolant, velocity, logit-normal t).
# Sizes: configs/fit/fitv2_*.py.
#
# FiTv2 runs its time the SiT way (s = 0 noise, x_s = s x + (1 - s) eps, predicting
# x - eps, s fed unscaled): time_flip (model time 1 - t), time_scale 1 and output_scale -1
# make the network's outputs those of the reference in flexgen's convention (t = 0 data,
# velocity eps - x). Its logit-normal s = sigmoid(u) is t = 1 - s = sigmoid(-u): the same
# distribution, so LogitNormalTime(0, 1) is FiTv2's "lognorm" exactly.
#
# Official weights (InfImagine/FiTv2: FiTv2_XL/model_ema.safetensors,
# FiTv2_3B/model_ema.bin and the HR fine-tunes) load through the 'FiTv2' converter.
model = dict(
    type='DiffusionGenerator',
    backbone=dict(
        type='FlexDiT', in_channels=4, patch_size=2, hidden_size=1152, depth=36,
        num_heads=16, num_classes=1000, learn_sigma=False, mlp_ratio=4.0,
        block=dict(type='AdaLNZeroBlock'), mlp=dict(type='SwiGLUMlp'),
        qk_norm='layernorm', modulation=dict(type='AdaLNLoRA', rank=288),
        global_modulation=dict(type='AdaLNZero'), pos_embed=None,
        rope=dict(type='AxialRoPE2D', theta=10000.0, layout='fit'),
        attn_backend='auto',
        time_scale=1.0, time_flip=True, output_scale=-1.0),
    transport=dict(type='Interpolant', path='linear', prediction='velocity',
                   train_eps=0.0, sample_eps=0.0),
    time_sampler=dict(type='LogitNormalTime', mean=0.0, std=1.0),
    # README: --sampler-mode ODE (torchdiffeq dopri5, atol 1e-6, rtol 1e-3; the 250 "steps"
    # only set output points), guidance 1.5 on latent channels 0-2 (FiT's DiT quirk).
    # The SDE alternative of sample_fitv2_ddp.py: EulerMaruyamaSDE(num_steps=250,
    # diffusion_form='sigma', diffusion_norm=1.0, last_step='Mean', last_step_size=0.04).
    sampler=dict(type='AdaptiveODE', atol=1e-6, rtol=1e-3),
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
