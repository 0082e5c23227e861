"""What the mmengine Runner needs beyond mmengine: the training loop, crash-safe
weights_only checkpoints, autocast mixed precision on any device, TF32 for the run,
sample previews, a console and logs a user can read (progress bars, the train step's own
time), and sharded training (FSDP2 wrapper, sharded EMA, sharded checkpoints)."""
from .checkpoint import (AtomicLocalBackend, FlexCheckpointHook, atomic_write,
                         restore_message_hub, to_plain)
from .ema import ShardedEMA, FlexEMAHook
from .fsdp import FullyShardedWrapper
from .hooks import (FlexRuntimeInfoHook, ProgressBarHook, SamplePreviewHook, TF32Hook,
                    TrainStepTimerHook)
from .log_processor import FlexLogProcessor
from .loops import FlexTrainLoop
from .optim_wrappers import AutocastOptimWrapper, FlexOptimWrapper
from .runner import FlexRunner

__all__ = [
    'AtomicLocalBackend', 'AutocastOptimWrapper', 'FlexCheckpointHook', 'FlexLogProcessor',
    'FlexOptimWrapper', 'FlexRunner', 'FlexRuntimeInfoHook', 'FlexTrainLoop',
    'FullyShardedWrapper', 'ProgressBarHook', 'SamplePreviewHook', 'ShardedEMA',
    'FlexEMAHook', 'TF32Hook', 'TrainStepTimerHook', 'atomic_write',
    'restore_message_hub', 'to_plain'
]
