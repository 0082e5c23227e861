"""The checkpoint-converter contract: a reference's released weights -> a flexgen backbone.

A converter is a class registered in ``CHECKPOINT_CONVERTERS`` (every constructor option
with a default), a subclass of :class:`CheckpointConverter`:

- ``name``: the reference's name, used in messages;
- ``matches(checkpoint) -> bool``: whether a loaded checkpoint (a state dict, or a
  training checkpoint wrapping one) is a network of this reference. It answers for any
  checkpoint, never raises, and is asked with default settings: ``load_official`` and
  ``tools/convert_checkpoint.py`` try every registered converter that matches;
- ``converter(checkpoint, use_ema=True) -> ConvertedCheckpoint``: the flexgen state dict
  and the ``FlexDiT`` settings the weights need; a checkpoint it cannot convert is refused
  with an error that names the converter and what does not fit.
"""
from dataclasses import dataclass, field
from typing import Dict

import torch

from flexgen.fileio import select_weights


@dataclass
class ConvertedCheckpoint:
    """A converter's result.

    Attributes:
        state_dict: ``FlexDiT`` keys and tensors (load into ``generator.backbone``).
        backbone: the ``FlexDiT`` constructor settings the weights imply (architecture and
            boundary settings); ``num_heads`` only where the width is a reference size or
            the converter was given it.
        info: facts about the source, e.g. ``grid_size`` (the square patch grid of a
            stored ``pos_embed``, i.e. the training resolution).
    """
    state_dict: Dict[str, torch.Tensor]
    backbone: dict
    info: dict = field(default_factory=dict)


def unwrap_state_dict(checkpoint: dict, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The network state dict inside a reference checkpoint: a plain state dict (the
    released files), a training checkpoint ``{'model', 'ema', 'opt', 'args'}`` or an
    mmengine one (EMA weights unless ``use_ema=False``; see
    :func:`flexgen.fileio.select_weights`); a ``module.`` prefix (DDP) is removed."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f'expected a checkpoint dict, got {type(checkpoint).__name__}')
    return select_weights(checkpoint, use_ema)[0]


class CheckpointConverter:
    """Base class of the official-checkpoint converters (see the module docstring)."""

    name = None

    def matches(self, checkpoint: dict) -> bool:
        raise NotImplementedError(f'{type(self).__name__} does not implement matches')

    def __call__(self, checkpoint: dict, use_ema: bool = True) -> ConvertedCheckpoint:
        raise NotImplementedError(f'{type(self).__name__} does not implement __call__')
