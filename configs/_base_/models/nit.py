# NiT (Wang et al. 2025, "Native-Resolution Image Synthesis", github.com/WZDTHU/NiT): a DiT
# on packed sequences of DC-AE f32c32 latents (32 channels, patch 1: one token per latent
# pixel, so a 256 px image is 64 tokens and a 512 px one 256). Blocks: adaLN-Zero with a
# per-head QK LayerNorm WITH affine (eps 1e-5), 2-D axial RoPE (theta 10000, interleaved
# pairs, first half of each head = column), GELU(tanh) MLP of 4x width, no absolute
# position embedding, no learned sigma. Sizes: configs/nit/ (this file is NiT-XL).
#
# Training (the reference's FlowMatchingLoss): linear flow x_t = (1 - t) x0 + t eps in
# flexgen time (NiT's own convention: t = 0 data, t fed raw to the sinusoid), velocity
# eps - x0, logit-normal(0, 1) t per image, per-token MSE + the direction loss
# 1 - cos(v_pred, v), both averaged over all tokens of the pack (loss_reduction='token'),
# plus REPA: 1 - cos between a 3-layer projector of the hidden tokens after block
# `feature_block` (the reference's encoder_depth) and frozen RADIO v2.5 features of the
# same image at 16 px per latent cell (weight 1.0, mean over tokens).
#
# Official weights (GoodEnough/NiT-XL-Models) load through the 'NiT' converter; they were
# trained with NiT's RoPE index quirk, so sampling them needs
# rope.index_mode='nit_legacy' (configs/nit/nit_xl_official.py). New training uses the
# true positions ('rowcol', identical on square images).
model = dict(
    type='DiffusionGenerator',
    backbone=dict(
        type='FlexDiT', in_channels=32, patch_size=1, hidden_size=1152, depth=28,
        num_heads=16, num_classes=1000, learn_sigma=False, mlp_ratio=4.0,
        block=dict(type='AdaLNZeroBlock'), mlp=dict(type='GeluMlp'),
        qk_norm=dict(type='layernorm_affine', eps=1e-5), modulation=dict(type='AdaLNZero'),
        pos_embed=None,
        rope=dict(type='AxialRoPE2D', theta=10000.0, layout='nit', index_mode='rowcol'),
        # 'auto': flash-attn's varlen kernel (or xformers) under bf16 on CUDA when
        # installed (NiT's own kernel), else SDPA grouped by image length; same numbers.
        attn_backend='auto',
        time_scale=1.0, time_flip=False, output_scale=1.0),
    transport=dict(type='RectifiedFlow'),
    time_sampler=dict(type='LogitNormalTime', mean=0.0, std=1.0),
    direction_loss=dict(type='DirectionLoss', weight=1.0),
    repa=dict(
        type='REPAHead',
        # RADIO v2.5-H (ViT-H/16, 1280-d features); a local checkpoint file (RADIO's release
        # .pth.tar; its architecture name is RADIO's own: see RADIOEncoder).
        encoder=dict(type='RADIOEncoder', checkpoint='checkpoints/radio_v2.5-h.pth.tar',
                     dtype='bfloat16'),
        feature_block=8, projector_dim=2048, weight=1.0, reduction='token',
        form='one_minus_cos'),
    # The README's 256 x 256 setting of NiT-XL-1000K (FID 2.16): Euler-Maruyama SDE, 250
    # steps on linspace(1, 0.04), w(t) = t, deterministic last step to 0; CFG 2.25 on all
    # channels for t in [0, 0.7]. Larger sizes use ODE 50 steps with other CFG settings
    # (configs/nit/nit_xl_official.py lists them).
    sampler=dict(type='EulerMaruyamaSDE', num_steps=250, diffusion_form='sigma',
                 diffusion_norm=1.0, last_step='Mean', last_step_size=0.04),
    guidance=dict(type='ClassifierFreeGuidance', scale=2.25, interval=(0.0, 0.7)),
    # The training data are latents already (NiTLatents): the DC-AE (f32c32: 32 channels,
    # 32 px per latent pixel) is loaded only when something decodes (sampling), so training
    # needs neither the network nor its 353M parameters on the GPUs.
    autoencoder=dict(type='DiffusersAutoencoder', kind='AutoencoderDC',
                     path='mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers',
                     latent_channels=32, downsample=32),
    inputs_are_latents=True,
    class_dropout_prob=0.1,
    loss_reduction='token')
