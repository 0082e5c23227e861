"""What the mmengine Runner needs beyond mmengine: the training loop, crash-safe
weights_only checkpoints, autocast mixed precision on any device and sample previews."""
from .checkpoint import (AtomicLocalBackend, FlexCheckpointHook, atomic_write,
                         restore_message_hub, to_plain)
from .hooks import SamplePreviewHook
from .loops import FlexTrainLoop
from .optim_wrappers import AutocastOptimWrapper

__all__ = [
    'AtomicLocalBackend', 'AutocastOptimWrapper', 'FlexCheckpointHook', 'FlexTrainLoop',
    'SamplePreviewHook', 'atomic_write', 'restore_message_hub', 'to_plain'
]
