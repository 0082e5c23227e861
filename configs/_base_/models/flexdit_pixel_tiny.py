# A tiny FlexDiT in pixel space (patch 2 on RGB), 2D RoPE, rectified flow: sized for
# training on a CPU in minutes.
model = dict(
    type='DiffusionGenerator',
    backbone=dict(
        type='FlexDiT', in_channels=3, patch_size=2, hidden_size=128, depth=4, num_heads=4,
        num_classes=6, mlp=dict(type='GeluMlp'), pos_embed=None,
        rope=dict(type='AxialRoPE2D')),
    transport=dict(type='RectifiedFlow'),
    time_sampler=dict(type='LogitNormalTime'),
    sampler=dict(type='EulerODE', num_steps=32),
    guidance=dict(type='ClassifierFreeGuidance', scale=2.0),
    autoencoder=dict(type='IdentityAutoencoder'),
    class_dropout_prob=0.1)
