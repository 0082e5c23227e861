# FiTv2-XL/2 at the resolutions of FiT's tables in one run of tools/test.py: 256 x 256 (the
# training grid: every rule is plain RoPE there), 320 x 320, 224 x 448 and 160 x 480
# (beyond it), with NTK-aware frequencies plus attention proportion ('ntkpro2'), one scale
# per axis, from the 16 x 16 training grid (the README's 320 x 320 recipe) and the
# README's sampling (dopri5 ODE, guidance 1.5). Every size gets its class-balanced
# requests, samples_{H}x{W}.npz and FID / sFID / IS / precision / recall against ADM's
# 256 x 256 reference batch; metrics.json / metrics.md hold the table (size, aspect ratio,
# tokens, metrics, time).
#
#   torchrun --nproc_per_node 8 tools/test.py configs/fit/fitv2_xl_2_multires.py \
#       FiTv2_XL/model_ema.safetensors --launcher pytorch --batch-size 32
# Other rules, all at once: tools/sweep_extrapolation.py (one row per rule and size).
_base_ = './fitv2_xl_2.py'

model = dict(backbone=dict(rope=dict(
    rule=dict(type='NTKPro2', ori_max_pe_len=16, decouple=True))))
test_dataloader = dict(dataset=dict(sizes=[(256, 256), (320, 320), (224, 448), (160, 480)]))
