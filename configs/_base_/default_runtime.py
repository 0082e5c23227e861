# Runtime shared by every flexgen config: hooks, logging, environment, seed.
# The training loop (train_cfg=dict(type='FlexTrainLoop', max_iters=...)), the optimiser
# and the learning-rate schedule come from configs/_base_/schedules/.
#
# Top-level keys: tools/train.py refuses keys that neither mmengine's Runner nor flexgen
# reads (a misspelled `trian_cfg` is an error, not a silent no-op). Helper variables of
# a config must start with an underscore, e.g. `_latent_size = 32`.
default_scope = 'flexgen'

default_hooks = dict(
    # The train step's scalars are read from the device once per logging interval (by
    # FlexTrainLoop), not once per step.
    runtime_info=dict(type='FlexRuntimeInfoHook'),
    # The training `time` counts the train step alone (not validation, previews, saves).
    timer=dict(type='TrainStepTimerHook'),
    # A bar over the batches of validation and test runs (they generate for minutes).
    progress=dict(type='ProgressBarHook'),
    logger=dict(type='LoggerHook', interval=100, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # Atomic writes, weights_only files; max_keep_ckpts prunes only after a save is whole.
    checkpoint=dict(type='FlexCheckpointHook', by_epoch=False, interval=10000,
                    max_keep_ckpts=3, save_last=True),
    # TF32 for float32 matmuls / convolutions on CUDA while the Runner trains or evaluates,
    # as DiT and SiT (DiT: 0.81 vs 0.51 steps/s on 8 A100). Off for bit-exact float32:
    # default_hooks = dict(tf32=dict(allow_tf32=False)), or on the command line
    # --cfg-options default_hooks.tf32.allow_tf32=False. (A hook argument rather than an
    # env_cfg key: a Runner built without a config keeps no env_cfg a hook could read.)
    tf32=dict(type='TF32Hook', allow_tf32=True),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # tools/train.py switches to gloo when --launcher pytorch runs without CUDA.
    dist_cfg=dict(backend='nccl'),
)

# Validation / test times are logged as val/time, test/time: `time` is the train step's.
log_processor = dict(type='FlexLogProcessor', by_epoch=False, window_size=50)

# tools/train.py adds dict(type='TensorboardVisBackend') when the optional `tensorboard`
# package is installed (pip install flexgen[dev] or tensorboard).
vis_backends = [dict(type='LocalVisBackend')]
# No fixed name: each Runner gets its own visualizer instance (named after the run).
visualizer = dict(type='Visualizer', vis_backends=vis_backends)

log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
