"""What the mmengine Runner needs beyond mmengine: the training loop, the sharded
generation (test) loop and the extrapolation sweep, crash-safe weights_only checkpoints,
autocast mixed precision on any device, TF32 for the run, sample previews, a console and
logs a user can read (progress bars, the train step's own time), and sharded training
(FSDP2 wrapper, sharded EMA, sharded checkpoints)."""
from .checkpoint import (AtomicLocalBackend, FlexCheckpointHook, atomic_write,
                         restore_message_hub, to_plain)
from .ema import FlexEMAHook, ShardedEMA
from .extrapolation_sweep import ExtrapolationSweep, sweep_variants
from .fsdp import FullyShardedWrapper
from .generation_loop import GenerationLoop, apply_generation_options
from .hooks import (FlexRuntimeInfoHook, ProgressBarHook, SamplePreviewHook, TF32Hook,
                    TrainStepTimerHook)
from .log_processor import FlexLogProcessor
from .loops import FlexTrainLoop
from .optim_wrappers import AutocastOptimWrapper, FlexOptimWrapper
from .runner import FlexRunner

__all__ = [
    'AtomicLocalBackend', 'AutocastOptimWrapper', 'ExtrapolationSweep', 'FlexCheckpointHook',
    'FlexEMAHook', 'FlexLogProcessor', 'FlexOptimWrapper', 'FlexRunner',
    'FlexRuntimeInfoHook', 'FlexTrainLoop', 'FullyShardedWrapper', 'GenerationLoop',
    'ProgressBarHook', 'SamplePreviewHook', 'ShardedEMA', 'TF32Hook', 'TrainStepTimerHook',
    'apply_generation_options', 'atomic_write', 'restore_message_hub', 'sweep_variants',
    'to_plain'
]
