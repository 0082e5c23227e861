# Sampling NiT-XL's released weights (HF GoodEnough/NiT-XL-Models: model_1000K.safetensors,
# model_1500K.safetensors) with flexgen. They load through the 'NiT' converter, which checks
# that this backbone is theirs; the one setting that differs from nit_xl_pack_16384.py is
# RoPE's index mode: NiT's released code gives token k of an h x w latent the positions
# (k mod h, k div h) (its meshgrid quirk; the true (column, row) only on square images),
# and the weights were trained so. REPA (training only) is left out.
#
#   python tools/sample.py configs/nit/nit_xl_official.py model_1000K.safetensors \
#       --classes 207 360 --height 256 --width 256
#   python tools/convert_checkpoint.py --from nit model_1000K.safetensors nit_xl_1000k.safetensors
#
# The README's settings (NiT-XL-1000K; t in flexgen time, t = 1 noise, guidance for t in
# [low, high]); 256 and 512 use this config's SDE, the others the Euler ODE:
#   256x256    SDE 250 steps  CFG 2.25 [0, 0.7]   FID 2.16
#   512x512    SDE 250 steps  CFG 2.05 [0, 0.7]   FID 1.57
#   768x768    ODE 50 steps   CFG 3.0  [0, 0.7]   FID 4.05
#   1024x1024  ODE 50 steps   CFG 3.0  [0, 0.8]   FID 4.52
#   1536x1536  ODE 50 steps   CFG 3.5  [0, 0.9]   FID 6.51
#   2048x2048  ODE 50 steps   CFG 4.5  [0, 0.9]   FID 24.76
#   320x960    ODE 50 steps   CFG 4.0  [0, 0.9]   FID 16.85
#   416x768    ODE 50 steps   CFG 2.75 [0, 0.7]   FID 4.11  (the paper's "432x768")
#   480x640    ODE 50 steps   CFG 2.75 [0, 0.7]   FID 3.72
#   640x480    ODE 50 steps   CFG 2.5  [0, 0.7]   FID 3.41
#   768x416    ODE 50 steps   CFG 2.85 [0, 0.7]   FID 5.27
#   960x320    ODE 50 steps   CFG 4.5  [0, 0.9]   FID 9.90
# e.g. 1024 px: --height 1024 --width 1024 --cfg-scale 3.0 --cfg-interval 0 0.8 \
#   --cfg-options "model.sampler=dict(_delete_=True,type='EulerODE',num_steps=50)"
# Sides must be multiples of 32 (the DC-AE's downsampling).
_base_ = ['./nit_xl_pack_16384.py']

model = dict(backbone=dict(rope=dict(index_mode='nit_legacy')), repa=None)
