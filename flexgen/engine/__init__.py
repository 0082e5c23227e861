"""What the mmengine Runner needs beyond mmengine: the training loop, crash-safe
weights_only checkpoints, autocast mixed precision on any device, TF32 for the run, sample
previews, and sharded training (FSDP2 wrapper, sharded EMA, sharded checkpoints,
FlexRunner)."""
from .checkpoint import (AtomicLocalBackend, FlexCheckpointHook, atomic_write,
                         restore_message_hub, to_plain)
from .ema import ShardedEMA, ShardedEMAHook
from .fsdp import FullyShardedWrapper
from .hooks import SamplePreviewHook, TF32Hook
from .loops import FlexTrainLoop
from .optim_wrappers import AutocastOptimWrapper
from .runner import FlexRunner

__all__ = [
    'AtomicLocalBackend', 'AutocastOptimWrapper', 'FlexCheckpointHook', 'FlexRunner',
    'FlexTrainLoop', 'FullyShardedWrapper', 'SamplePreviewHook', 'ShardedEMA',
    'ShardedEMAHook', 'TF32Hook', 'atomic_write', 'restore_message_hub', 'to_plain'
]
