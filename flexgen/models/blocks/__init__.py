"""FlexDiT's blocks: the contract (:mod:`.base`) and DiT's adaLN-Zero block."""
from .adaln_zero import AdaLNZeroBlock, build_modulation
from .base import SHARED_OPTIONS, TransformerBlock, build_block

__all__ = ['AdaLNZeroBlock', 'build_modulation', 'SHARED_OPTIONS', 'TransformerBlock',
           'build_block']
