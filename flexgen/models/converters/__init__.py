"""Official-checkpoint converters: a reference's state dict -> a flexgen state dict.

Each converter registers in ``CHECKPOINT_CONVERTERS``; ``tools/convert_checkpoint.py`` and
``flexgen.apis.load_official`` look them up by name.
"""
from .dit_sit import ConvertedCheckpoint, DiTConverter, SiTConverter, unwrap_state_dict
from .fit import FiTv1Converter, FiTv2Converter
from .nit import NiTConvertedCheckpoint, NiTConverter

__all__ = ['ConvertedCheckpoint', 'DiTConverter', 'SiTConverter', 'unwrap_state_dict',
           'FiTv1Converter', 'FiTv2Converter', 'NiTConvertedCheckpoint', 'NiTConverter']
