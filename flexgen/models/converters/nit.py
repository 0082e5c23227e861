"""NiT (Wang et al. 2025, "Native-Resolution Image Synthesis", github.com/WZDTHU/NiT)
official checkpoints -> ``FlexDiT`` (+ the REPA projector).

The reference network (``nit/models/c2i/nit_model.py``, class ``NiT``) is a DiT block stack
on packed sequences: per-head QK LayerNorm with affine (eps 1e-5), 2-D axial RoPE in
interleaved pairs, GELU(tanh) MLP, patch 1 over DC-AE f32c32 latents (32 channels), no
absolute position embedding, no learned sigma; NiT-XXL uses a per-block AdaLN-LoRA
(``adaLN_modulation.1`` = ``Linear(D, r)``, ``.2`` = ``Linear(r, 6D)``). Its module names
are FlexDiT's, so the tensors carry over; what the converter adds:

- ``x_embedder.proj.weight``: the reference's ``Conv2d(C, D, p)`` weight ``[D, C, p, p]``
  is flexgen's ``Linear`` on ``(c, p1, p2)`` tokens (a reshape). The reference's output
  rows are already ``(c, p1, p2)`` (it reshapes ``[N, C*p*p]`` to ``[N, C, p, p]``), so the
  final layer is unchanged.
- time: NiT feeds its flow time ``t`` in [0, 1] RAW to the sinusoid, with t = 0 data and
  ``x_t = (1 - t) x0 + t eps``: flexgen's own convention, so ``time_scale=1``, no flip.
  It predicts ``v = eps - x0 = d x_t / d t``: flexgen's velocity sign, ``output_scale=1``.
- RoPE: ``AxialRoPE2D(layout='nit', index_mode='nit_legacy')``. NiT's first rotary half
  follows ``k mod h``, its second ``k div h`` for token ``k`` of an ``h x w`` image (its
  ``meshgrid(..., indexing='xy')``): the true (column, row) on square images, a re-wrapped
  grid on non-square ones. The released weights were trained that way, so
  ``'nit_legacy'`` reproduces them; new training should use the true positions
  (``index_mode='rowcol'``, the configs' default). Option ``index_mode`` chooses.
- ``projector.{0,2,4}.*`` (REPA's ``build_mlp``, applied after block ``encoder_depth``) is not
  part of the backbone: it goes to ``repa_state_dict`` (keys of
  :class:`flexgen.models.repa.REPAHead`, ``projectors.0.{0,2,4}.*``), and
  :meth:`NiTConvertedCheckpoint.generator_state_dict` gives both under a generator's
  prefixes (``backbone.``, ``repa.``). Sampling never needs it; REPA fine-tuning does.
  ``encoder_depth`` is not in the weights: the configs state it.
"""
from dataclasses import dataclass, field
from typing import Dict

import torch

from flexgen.registry import CHECKPOINT_CONVERTERS
from .base import CheckpointConverter, ConvertedCheckpoint, unwrap_state_dict

INDEX_MODES = ('nit_legacy', 'rowcol')
# NiT's block keys (without the adaLN, whose form depends on AdaLN-LoRA).
_BLOCK_KEYS = ('attn.qkv.weight', 'attn.qkv.bias', 'attn.q_norm.weight', 'attn.q_norm.bias',
               'attn.k_norm.weight', 'attn.k_norm.bias', 'attn.proj.weight', 'attn.proj.bias',
               'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')
_TOP_KEYS = ('x_embedder.proj.weight', 'x_embedder.proj.bias',
             't_embedder.mlp.0.weight', 't_embedder.mlp.0.bias',
             't_embedder.mlp.2.weight', 't_embedder.mlp.2.bias',
             'y_embedder.embedding_table.weight',
             'final_layer.linear.weight', 'final_layer.linear.bias',
             'final_layer.adaLN_modulation.1.weight', 'final_layer.adaLN_modulation.1.bias')
_PROJECTOR_KEYS = tuple(f'projector.{i}.{kind}' for i in (0, 2, 4)
                        for kind in ('weight', 'bias'))


@dataclass
class NiTConvertedCheckpoint(ConvertedCheckpoint):
    """:class:`ConvertedCheckpoint` plus the REPA projector.

    Attributes:
        repa_state_dict: ``REPAHead`` keys (``projectors.0.{0,2,4}.{weight,bias}``), empty
            when the file has no projector.
        repa: the ``REPAHead`` settings the projector implies (``hidden_size``,
            ``projector_dim``, ``z_dims``); empty without a projector.
    """
    repa_state_dict: Dict[str, torch.Tensor] = field(default_factory=dict)
    repa: dict = field(default_factory=dict)

    def generator_state_dict(self) -> Dict[str, torch.Tensor]:
        """Both parts under a ``DiffusionGenerator``'s names (``backbone.*``, ``repa.*``)."""
        out = {f'backbone.{k}': v for k, v in self.state_dict.items()}
        out.update({f'repa.{k}': v for k, v in self.repa_state_dict.items()})
        return out


def nit_depth(state_dict: dict) -> int:
    return 1 + max((int(k.split('.')[1]) for k in state_dict
                    if k.startswith('blocks.') and k.split('.')[1].isdigit()), default=-1)


def is_official_nit(state_dict: dict) -> bool:
    """A reference NiT network: a 4-D patch convolution, QK LayerNorm with affine and a
    plain ``fc1`` MLP (DiT / SiT have no q_norm, FiT has SwiGLU ``fc1_g``, flexgen's own
    files hold a 2-D patch weight)."""
    weight = state_dict.get('x_embedder.proj.weight')
    return (isinstance(weight, torch.Tensor) and weight.dim() == 4
            and 'blocks.0.attn.q_norm.bias' in state_dict
            and 'blocks.0.mlp.fc1.weight' in state_dict and 'pos_embed' not in state_dict)


@CHECKPOINT_CONVERTERS.register_module(name='NiT')
class NiTConverter(CheckpointConverter):
    """Reference ``NiT`` state dict -> :class:`NiTConvertedCheckpoint`.

    ``converter(checkpoint, use_ema=True)``: ``checkpoint`` is the released safetensors
    dict (``GoodEnough/NiT-XL-Models``: ``model_1000K.safetensors``, ...; a plain state dict,
    most likely the EMA weights), accelerate's ``model.safetensors`` of a training state, or
    a ``{'ema': ..., 'model': ...}`` wrapper (``use_ema`` chooses). The ``backbone`` settings
    are every ``FlexDiT`` argument the weights need (sizes, heads from the QK-norm width,
    AdaLN-LoRA rank, MLP width, RoPE, time boundary), so ``FlexDiT(**backbone)`` loads
    ``state_dict`` with ``strict=True``.

    Args:
        index_mode: RoPE positions: ``'nit_legacy'`` (default: what the released weights
            were trained and sampled with) or ``'rowcol'`` (true positions; equal on square
            images only).
        rope: further ``AxialRoPE2D`` settings, e.g. an extrapolation ``rule``.
        attn_backend: how attention is computed (not a setting of the weights).
    """

    name = 'NiT'

    def __init__(self, index_mode='nit_legacy', rope=None, attn_backend='sdpa'):
        if index_mode not in INDEX_MODES:
            raise ValueError(f'NiT converter: index_mode must be one of {INDEX_MODES}, '
                             f'got {index_mode!r}')
        self.index_mode, self.rope, self.attn_backend = index_mode, dict(rope or {}), attn_backend

    def matches(self, checkpoint) -> bool:
        return isinstance(checkpoint, dict) and is_official_nit(unwrap_state_dict(checkpoint))

    # ------------------------------------------------------------------ checks
    @staticmethod
    def expected_keys(depth: int, lora: bool) -> set:
        adaln = ('adaLN_modulation.1', 'adaLN_modulation.2') if lora else ('adaLN_modulation.1',)
        keys = set(_TOP_KEYS)
        for i in range(depth):
            keys.update(f'blocks.{i}.{k}' for k in _BLOCK_KEYS)
            keys.update(f'blocks.{i}.{m}.{kind}' for m in adaln for kind in ('weight', 'bias'))
        return keys

    def _check_keys(self, source: dict, depth: int, lora: bool) -> None:
        expected = self.expected_keys(depth, lora)
        present = set(source) - set(_PROJECTOR_KEYS)
        missing, unexpected = sorted(expected - present), sorted(present - expected)
        projector = [k for k in _PROJECTOR_KEYS if k in source]
        if projector and len(projector) != len(_PROJECTOR_KEYS):
            missing += sorted(set(_PROJECTOR_KEYS) - set(projector))
        if missing or unexpected:
            raise KeyError(f'NiT converter: not a reference NiT state dict (depth {depth}'
                           f'{", AdaLN-LoRA" if lora else ""}): missing keys {missing[:8]}'
                           f'{" ..." if len(missing) > 8 else ""}, unexpected keys '
                           f'{unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}')

    # ------------------------------------------------------------------ conversion
    def infer_backbone(self, source: dict) -> dict:
        """The ``FlexDiT`` settings of a NiT state dict (shapes -> sizes)."""
        proj = source['x_embedder.proj.weight']
        if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
            raise ValueError(f'NiT converter: x_embedder.proj.weight has shape '
                             f'{tuple(proj.shape)}, expected a Conv2d weight [D, C, p, p] '
                             '(is it already a flexgen state dict?)')
        hidden, in_channels, patch = (int(s) for s in proj.shape[:3])
        depth = nit_depth(source)
        if depth == 0:
            raise KeyError('NiT converter: no blocks.N.* keys in the checkpoint')
        head_dim = int(source['blocks.0.attn.q_norm.weight'].shape[0])
        if hidden % head_dim:
            raise ValueError(f'NiT converter: width {hidden} is not a multiple of the QK-norm '
                             f'width {head_dim} (the head dimension)')
        out_rows = int(source['final_layer.linear.weight'].shape[0])
        if out_rows != patch * patch * in_channels:
            raise ValueError(f'NiT converter: final_layer.linear.weight has {out_rows} rows, '
                             f'expected p*p*C = {patch * patch * in_channels}')
        mlp_hidden = int(source['blocks.0.mlp.fc1.weight'].shape[0])
        mlp = dict(type='GeluMlp')
        if mlp_hidden != int(hidden * 4.0):
            mlp['hidden_features'] = mlp_hidden
        rope = dict(dict(type='AxialRoPE2D', theta=10000.0, layout='nit',
                         index_mode=self.index_mode), **self.rope)
        backbone = dict(
            in_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=depth,
            num_heads=hidden // head_dim,
            num_classes=int(source['y_embedder.embedding_table.weight'].shape[0]) - 1,
            learn_sigma=False, mlp_ratio=4.0, block=dict(type='AdaLNZeroBlock'), mlp=mlp,
            qk_norm=dict(type='layernorm_affine', eps=1e-5), pos_embed=None, rope=rope,
            attn_backend=self.attn_backend, global_modulation=None,
            time_scale=1.0, time_flip=False, output_scale=1.0)
        if 'blocks.0.adaLN_modulation.2.weight' in source:
            backbone['modulation'] = dict(
                type='AdaLNLoRA', rank=int(source['blocks.0.adaLN_modulation.1.weight'].shape[0]))
        else:
            backbone['modulation'] = dict(type='AdaLNZero')
        return backbone

    def __call__(self, checkpoint: dict, use_ema: bool = True) -> NiTConvertedCheckpoint:
        source = unwrap_state_dict(checkpoint, use_ema)
        if 'x_embedder.proj.weight' not in source:
            raise KeyError(f'NiT converter: no x_embedder.proj.weight in the checkpoint (keys '
                           f'start with {sorted(source)[:4]})')
        if 'blocks.0.attn.q_norm.weight' not in source:
            raise KeyError('NiT converter: no blocks.0.attn.q_norm.weight (NiT\'s QK '
                           'LayerNorm); a DiT / SiT / FiT checkpoint needs its own converter')
        backbone = self.infer_backbone(source)
        lora = backbone['modulation']['type'] == 'AdaLNLoRA'
        self._check_keys(source, backbone['depth'], lora)

        converted = {}
        for key, value in source.items():
            if key.startswith('projector.'):
                continue
            if key == 'x_embedder.proj.weight':
                value = value.reshape(value.shape[0], -1)
            converted[key] = value.contiguous()
        repa_state, repa = {}, {}
        if 'projector.0.weight' in source:
            repa_state = {f'projectors.0.{k[len("projector."):]}': source[k].contiguous()
                          for k in _PROJECTOR_KEYS}
            repa = dict(hidden_size=backbone['hidden_size'],
                        projector_dim=int(source['projector.0.weight'].shape[0]),
                        z_dims=[int(source['projector.4.weight'].shape[0])])
        info = dict(has_projector=bool(repa_state), index_mode=self.index_mode)
        return NiTConvertedCheckpoint(converted, backbone, info, repa_state, repa)
