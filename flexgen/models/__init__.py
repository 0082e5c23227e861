from .autoencoders import DiffusersAutoencoder, IdentityAutoencoder
from .backbones import FlexDiT
from .blocks import AdaLNZeroBlock, FinalLayer
from .generator import DiffusionGenerator
from .layers import *  # noqa: F401,F403

__all__ = ['DiffusersAutoencoder', 'IdentityAutoencoder', 'FlexDiT', 'AdaLNZeroBlock',
           'FinalLayer', 'DiffusionGenerator']
