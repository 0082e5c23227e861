"""Multi-head self-attention on a jagged token batch, with optional QK-norm and RoPE."""
import torch
import torch.nn as nn

from flexgen.position_encodings.rope import apply_rotary
from .attention_backends import build_attention_backend
from .norms import build_norm


@torch.compiler.disable
def attend(backend, q, k, v, batch):
    """The backend's call, outside any compiled region: its segment plan (Python lists
    that change with every pack) would otherwise make torch.compile recompile per pack."""
    return backend(q, k, v, batch)


class Attention(nn.Module):
    """``qkv`` projection -> (QK-norm) -> (RoPE) -> block-diagonal attention -> ``proj``.

    q, k and v reach the attention backend in one dtype, v's (the projection's: bf16
    under autocast), whatever the QK-norm computed in.

    Parameter names follow timm's ``Attention`` (``qkv``, ``proj``, ``q_norm``,
    ``k_norm``) so DiT / SiT / FiT / NiT checkpoints map one to one.
    """

    def __init__(self, dim, num_heads, qkv_bias=True, qk_norm=None, qk_norm_eps=1e-6,
                 backend='sdpa'):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'Attention: dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = build_norm(qk_norm, self.head_dim, qk_norm_eps)
        self.k_norm = build_norm(qk_norm, self.head_dim, qk_norm_eps)
        self.proj = nn.Linear(dim, dim)
        self.backend = build_attention_backend(backend)

    def forward(self, x, batch, rope=None):
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # One dtype for the kernel (as NiT casts): under autocast the QK-norm runs in
        # float32 and RoPE keeps it, while v comes from the bf16 projection.
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = attend(self.backend, q, k, v, batch)
        return self.proj(out.reshape(x.shape[0], -1))
