from .attention import Attention
from .attention_backends import (AutoAttention, PaddedAttention, PerImageAttention,
                                 SDPAAttention, build_attention_backend)
from .attention_flex import FlexAttention, document_block_mask, flex_attention_available
from .attention_varlen import FlashVarlenAttention, TorchVarlenAttention, XFormersAttention
from .embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, timestep_embedding
from .final_layer import FinalLayer
from .mlp import GeluMlp, SwiGLUMlp
from .modulation import AdaLNLoRA, AdaLNZero, gate, modulate, zero_linear
from .norms import build_norm

__all__ = ['Attention', 'AutoAttention', 'FlexAttention', 'document_block_mask',
           'flex_attention_available', 'FlashVarlenAttention', 'TorchVarlenAttention',
           'XFormersAttention', 'PaddedAttention', 'PerImageAttention', 'SDPAAttention',
           'build_attention_backend', 'LabelEmbedder', 'PatchEmbed', 'TimestepEmbedder',
           'timestep_embedding', 'FinalLayer', 'GeluMlp', 'SwiGLUMlp', 'AdaLNLoRA', 'AdaLNZero',
           'gate', 'modulate', 'zero_linear', 'build_norm']
