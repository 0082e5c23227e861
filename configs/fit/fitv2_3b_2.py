# FiTv2-3B/2 (Wang et al. 2024): FiTv2-XL/2's recipe with 40 blocks of width 2304, 24
# heads, AdaLN-LoRA rank 576, SwiGLU width 6144: 2,971,928,080 parameters (README: 3B,
# 653 GFLOPs). Reference: configs/fitv2/config_fitv2_3B.yaml.
#
#   python tools/sample.py configs/fit/fitv2_3b_2.py FiTv2_3B/model_ema.bin \
#       --classes 207 360 --height 256 --width 256 --cfg-scale 1.5
_base_ = ['./fitv2_xl_2.py']

model = dict(backbone=dict(hidden_size=2304, depth=40, num_heads=24,
                           modulation=dict(type='AdaLNLoRA', rank=576)))
