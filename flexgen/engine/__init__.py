"""What the mmengine Runner needs beyond mmengine: the training loop, the sharded
generation (test) loop, crash-safe weights_only checkpoints, autocast mixed precision on
any device and sample previews."""
from .checkpoint import (AtomicLocalBackend, FlexCheckpointHook, atomic_write,
                         restore_message_hub, to_plain)
from .extrapolation_sweep import ExtrapolationSweep, sweep_variants
from .generation_loop import GenerationLoop, apply_generation_options
from .hooks import SamplePreviewHook
from .loops import FlexTrainLoop
from .optim_wrappers import AutocastOptimWrapper

__all__ = [
    'AtomicLocalBackend', 'AutocastOptimWrapper', 'ExtrapolationSweep', 'FlexCheckpointHook',
    'FlexTrainLoop', 'GenerationLoop', 'SamplePreviewHook', 'apply_generation_options', 'atomic_write',
    'restore_message_hub', 'sweep_variants', 'to_plain'
]
