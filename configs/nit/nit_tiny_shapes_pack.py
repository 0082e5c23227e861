# NiT's recipe at demo scale, on a CPU: a 4-block width-128 FlexDiT with NiT's blocks
# (QK LayerNorm with affine, axial RoPE in NiT's layout, GELU MLP, no absolute position
# embedding) trained on packs of the embedded shapes (1024 tokens of patch-2 pixels per
# step, OnlinePackSampler), rectified flow with logit-normal t, MSE + direction loss
# averaged over all tokens of the pack (loss_reduction='token'), AdamW (0.9, 0.95) with
# weight decay 0.01, gradient clipping at 1.0, EMA. No REPA (it needs a pretrained
# encoder; e.g. --cfg-options "model.repa=dict(type='REPAHead', encoder=dict(
# type='DINOv2Encoder', weights='dinov2_vits14.pth', arch='dinov2-vit-s'), feature_block=2,
# weight=1.0, reduction='token', form='one_minus_cos')").
#
#   python tools/train.py configs/nit/nit_tiny_shapes_pack.py
#   torchrun --nproc_per_node 2 tools/train.py configs/nit/nit_tiny_shapes_pack.py \
#       --launcher pytorch
_base_ = [
    '../_base_/models/nit.py',
    '../_base_/datasets/shapes_packed.py',
    '../_base_/schedules/nit.py',
    '../_base_/default_runtime.py',
]

model = dict(
    backbone=dict(in_channels=3, patch_size=2, hidden_size=128, depth=4, num_heads=4,
                  num_classes=6),
    repa=None,
    sampler=dict(_delete_=True, type='EulerODE', num_steps=32),
    guidance=dict(scale=2.0, interval=(0.0, 1.0)),
    autoencoder=dict(_delete_=True, type='IdentityAutoencoder'),
    inputs_are_latents=False)

_iters = 3000
optim_wrapper = dict(
    _delete_=True, type='FlexOptimWrapper',  # float32: bf16 autocast is slower on most CPUs
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-6),
    clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=200),
    dict(type='CosineAnnealingLR', T_max=_iters - 200, eta_min=1e-4, by_epoch=False,
         begin=200, end=_iters),
]
train_cfg = dict(max_iters=_iters, val_interval=_iters)
val_cfg = dict(_delete_=True, type='ValLoop')
test_cfg = dict(_delete_=True, type='GenerationLoop')

default_hooks = dict(logger=dict(interval=100),
                     checkpoint=dict(interval=1000, max_keep_ckpts=1))
custom_hooks = [dict(type='FlexEMAHook', momentum=1e-3, priority='ABOVE_NORMAL')]
