# FiTv2-3B/2 high-resolution fine-tuning (reference: configs/fitv2/config_fitv2_hr_3B.yaml):
# fitv2_hr_xl_2.py with the 3B network, 200K steps, activation checkpointing of every
# block (the reference's use_checkpoint) and guidance 1.5 (README). The start
# checkpoint is FiTv2-3B/2 (FiTv2_3B/model_ema.bin) converted without the re-initialised
# tensors, as fitv2_hr_xl_2.py shows.
#
#   python tools/sample.py configs/fit/fitv2_hr_3b_2.py FiTv2_3B_HRFT/model_ema.safetensors \
#       --classes 207 360 --height 512 --width 512 --cfg-scale 1.5
_base_ = ['./fitv2_hr_xl_2.py']

model = dict(backbone=dict(hidden_size=2304, depth=40, num_heads=24,
                           modulation=dict(type='AdaLNLoRA', rank=576)),
             guidance=dict(scale=1.5))
load_from = 'checkpoints/fitv2_3b_hr_init.pth'
train_cfg = dict(max_iters=200_000, val_interval=200_000)
activation_checkpointing = [f'backbone.blocks.{i}' for i in range(40)]
# Memory (tools/memory_plan.py configs/fit/fitv2_hr_3b_2.py --amp --gpus 8 --gpu-memory 80):
# 16 images of up to 1024 tokens per GPU; with every block checkpointed DDP needs about
# 37 GiB per GPU (fp32 weights and EMA of all 3B parameters; gradients and AdamW moments
# of the 0.42B trainable ones), fused AdamW and gradient_as_bucket_view included.
model_wrapper_cfg = dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                         gradient_as_bucket_view=True)
optim_wrapper = dict(optimizer=dict(fused=True))
