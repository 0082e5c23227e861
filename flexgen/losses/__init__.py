"""Losses beyond the transports' own: REPA alignment and NiT's direction loss."""
from .direction import DirectionLoss, direction_loss
from .repa import REPALoss, repa_alignment_loss

__all__ = ['DirectionLoss', 'direction_loss', 'REPALoss', 'repa_alignment_loss']
