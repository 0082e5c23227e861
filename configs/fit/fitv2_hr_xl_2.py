# FiTv2-XL/2 high-resolution fine-tuning (Wang et al. 2024, section 3.4; reference:
# configs/fitv2/config_fitv2_hr_xl.yaml): FiTv2-XL/2 continued on images of up to 1024
# tokens (512 x 512 pixels of area) for 400K steps at a constant lr 1e-4 (x global batch
# / 256, no warm-up), with the RoPE of every training image scaled for its own size
# (NTK-aware, one scale per axis, relative to the 16 x 16 pre-training grid: the
# reference's online_rope; sampling uses the same rule, the README's
# "--interpolation dynntk --decouple --ori-max-pe-len 16"). Guidance 1.65 (README).
#
# What starts fresh and what trains, as the reference's finetune='partial' with
# ignore_keys ['x_embedder', 'bias', 'LN', 'final_layer'] (name substrings; 'LN' matches
# every adaLN_modulation, including the LoRA factors and the global one):
# - re-initialised: every parameter whose name contains one of them (the patch embedding,
#   every bias, every adaLN linear, the final layer) is NOT taken from the pre-trained
#   model; it keeps FlexDiT's initialisation (xavier patch embedding and LoRA down-
#   projections, zero biases, zero adaLN outputs and final layer), which is the reference's;
# - trained: exactly those parameters (FlexDiT trainable=...: requires_grad only there, so
#   attention / MLP weights, the timestep MLP weights and the class table stay frozen at
#   their pre-trained values, get no gradient and count in no clipping norm).
# The start checkpoint is the FiTv2-XL/2 EMA converted without those tensors, loaded by
# load_from with exactly those allowed to be missing (the checkpoint hook's allow_missing;
# any other missing, unexpected or misshapen tensor is refused), e.g. in Python:
#   from safetensors.torch import load_file; import torch
#   from flexgen.apis.official import build_converter
#   conv = build_converter(dict(type='FiTv2', exclude=('x_embedder', 'bias', 'LN', 'final_layer')))
#   sd = conv(load_file('FiTv2_XL/model_ema.safetensors')).state_dict
#   torch.save({'state_dict': {f'backbone.{k}': v for k, v in sd.items()}},
#              'checkpoints/fitv2_xl_hr_init.pth')
#
#   python tools/train.py configs/fit/fitv2_hr_xl_2.py --amp --launcher pytorch
#   python tools/sample.py configs/fit/fitv2_hr_xl_2.py FiTv2_XL_HRFT/model_ema.safetensors \
#       --classes 207 360 --height 512 --width 512 --cfg-scale 1.65
_base_ = ['./fitv2_xl_2.py']

_target_len = 1024
# InfImagine/imagenet_features_1024_sd_vae_ft_ema, extracted
_data_root = 'data/imagenet1k_latents_1024_sd_vae_ft_ema'
_reinitialised = ('x_embedder', 'bias', 'LN', 'final_layer')

model = dict(
    backbone=dict(
        rope=dict(rule=dict(type='NTKAware', ori_max_pe_len=16, decouple=True),
                  scale_in_training=True),
        trainable=_reinitialised),
    guidance=dict(scale=1.65))

train_dataloader = dict(
    dataset=dict(data_root=_data_root, target_len=_target_len),
    collate_fn=dict(max_length=_target_len))
test_dataloader = dict(dataset=dict(sizes=[(512, 512)]))
test_evaluator = dict(reference='data/adm_reference/VIRTUAL_imagenet512.npz')

load_from = 'checkpoints/fitv2_xl_hr_init.pth'
default_hooks = dict(checkpoint=dict(allow_missing=_reinitialised))
param_scheduler = []
train_cfg = dict(max_iters=400_000, val_interval=400_000)
# The reference also keeps the steps 40K, 80K, 100K and 200K.
