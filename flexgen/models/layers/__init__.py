from .attention import Attention
from .attention_backends import (PaddedAttention, PerImageAttention, SDPAAttention,
                                 build_attention_backend)
from .embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, timestep_embedding
from .mlp import GeluMlp, SwiGLUMlp
from .modulation import AdaLNLoRA, AdaLNZero, gate, modulate
from .norms import build_norm

__all__ = ['Attention', 'PaddedAttention', 'PerImageAttention', 'SDPAAttention',
           'build_attention_backend', 'LabelEmbedder', 'PatchEmbed', 'TimestepEmbedder',
           'timestep_embedding', 'GeluMlp', 'SwiGLUMlp', 'AdaLNLoRA', 'AdaLNZero', 'gate',
           'modulate', 'build_norm']
