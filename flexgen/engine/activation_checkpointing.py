"""Activation checkpointing of named sub-modules (a config's ``activation_checkpointing``).

Each named module recomputes its forward in backward instead of keeping its activations,
through torch's non-reentrant ``torch.utils.checkpoint``. mmengine's own wrapper is not
used: it calls torch's checkpoint with the implicit reentrant default (deprecated by torch,
and under it a module whose inputs need no gradient, e.g. a first block after a frozen
patch embedding, silently gives its parameters none) and drops keyword arguments.
"""
import functools
from operator import attrgetter
from typing import Sequence, Union

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def turn_on_activation_checkpointing(model: nn.Module, modules: Union[str, Sequence[str]]
                                     ) -> None:
    """Checkpoint the forward of every sub-module of ``model`` named in ``modules``
    (dotted names, e.g. ``'backbone.blocks.0'``)."""
    for name in [modules] if isinstance(modules, str) else modules:
        try:
            module = attrgetter(name)(model)
        except AttributeError as error:
            raise ValueError(f'activation_checkpointing names {name!r}, which the model '
                             f'({type(model).__name__}) does not have') from error
        module.forward = _checkpointed(module.forward)


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run
