"""What the mmengine Runner needs beyond mmengine: the training loop, crash-safe
weights_only checkpoints, autocast mixed precision on any device, TF32 for the run and
sample previews."""
from .checkpoint import (AtomicLocalBackend, FlexCheckpointHook, atomic_write,
                         restore_message_hub, to_plain)
from .hooks import SamplePreviewHook, TF32Hook
from .loops import FlexTrainLoop
from .optim_wrappers import AutocastOptimWrapper

__all__ = [
    'AtomicLocalBackend', 'AutocastOptimWrapper', 'FlexCheckpointHook', 'FlexTrainLoop',
    'SamplePreviewHook', 'TF32Hook', 'atomic_write', 'restore_message_hub', 'to_plain'
]
