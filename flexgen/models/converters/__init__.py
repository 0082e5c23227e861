"""Official-checkpoint converters: a reference's state dict -> a flexgen state dict.

Each converter (:class:`~.base.CheckpointConverter`) registers in
``CHECKPOINT_CONVERTERS``; ``tools/convert_checkpoint.py`` and
``flexgen.apis.load_official`` look them up by name or by ``matches``.
"""
from .base import CheckpointConverter, ConvertedCheckpoint, unwrap_state_dict
from .dit_sit import DiTConverter, SiTConverter
from .fit import FiTv1Converter, FiTv2Converter
from .nit import NiTConvertedCheckpoint, NiTConverter

__all__ = ['CheckpointConverter', 'ConvertedCheckpoint', 'unwrap_state_dict', 'DiTConverter',
           'SiTConverter', 'FiTv1Converter', 'FiTv2Converter', 'NiTConvertedCheckpoint',
           'NiTConverter']
