# FiTv2-3B/2 (Wang et al. 2024): FiTv2-XL/2's recipe with 40 blocks of width 2304, 24
# heads, AdaLN-LoRA rank 576, SwiGLU width 6144: 2,971,928,080 parameters (README: 3B,
# 653 GFLOPs). Reference: configs/fitv2/config_fitv2_3B.yaml.
#
# Memory (tools/memory_plan.py configs/fit/fitv2_3b_2.py --gpus 8 --gpu-memory 80): under
# DDP the fp32 weights, gradients, DDP buckets, AdamW moments and EMA alone are 24 bytes per
# parameter (66 GiB per GPU) before 18 GiB of activations (16 images x 256 tokens per GPU):
# it does not fit 80 GB. Sharded over 8 GPUs (FSDP2, bf16 compute over fp32 master
# weights, fused AdamW, the EMA kept per shard) the same run needs about 25 GiB per GPU,
# with no activation checkpointing (no recomputed forward).
#
#   torchrun --nproc_per_node 8 tools/train.py configs/fit/fitv2_3b_2.py --launcher pytorch
#   python tools/consolidate_checkpoint.py work_dirs/fitv2_3b_2/iter_2000000.pth fitv2_3b.safetensors
#   python tools/sample.py configs/fit/fitv2_3b_2.py FiTv2_3B/model_ema.bin \
#       --classes 207 360 --height 256 --width 256 --cfg-scale 1.5
_base_ = ['./fitv2_xl_2.py']

model = dict(backbone=dict(hidden_size=2304, depth=40, num_heads=24,
                           modulation=dict(type='AdaLNLoRA', rank=576)))

model_wrapper_cfg = dict(type='FullyShardedWrapper',
                         mixed_precision=dict(param_dtype='bfloat16', reduce_dtype='float32'))
optim_wrapper = dict(optimizer=dict(fused=True))
# fitv2_xl_2.py's EMA (decay 0.9999), per shard.
custom_hooks = [dict(type='FlexEMAHook', momentum=1e-4, priority='ABOVE_NORMAL')]
