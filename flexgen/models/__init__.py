from .autoencoders import DiffusersAutoencoder, IdentityAutoencoder
from .backbones import FlexDiT
from .blocks import AdaLNZeroBlock, TransformerBlock
from .data_preprocessor import FlexDataPreprocessor
from .generator import DiffusionGenerator
from .layers import *  # noqa: F401,F403
from .repa import REPAHead, REPAProjector
from .vision_encoders import DINOv2Encoder, RADIOEncoder, TimmViTEncoder

__all__ = ['DiffusersAutoencoder', 'IdentityAutoencoder', 'FlexDiT', 'AdaLNZeroBlock',
           'TransformerBlock', 'FinalLayer', 'FlexDataPreprocessor', 'DiffusionGenerator',
           'REPAHead', 'REPAProjector', 'DINOv2Encoder', 'RADIOEncoder', 'TimmViTEncoder']
