"""Official-checkpoint converters: a reference's state dict -> a flexgen state dict.

Each converter registers in ``CHECKPOINT_CONVERTERS``; ``tools/convert_checkpoint.py`` and
``flexgen.apis.load_official`` look them up by name.
"""
from .dit_sit import ConvertedCheckpoint, DiTConverter, SiTConverter, unwrap_state_dict

__all__ = ['ConvertedCheckpoint', 'DiTConverter', 'SiTConverter', 'unwrap_state_dict']
