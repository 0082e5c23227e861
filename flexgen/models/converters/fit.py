"""FiT (Lu et al. 2024) and FiTv2 (Wang et al. 2024) official checkpoints -> FlexDiT.

The reference model (github.com/whlzy/FiT, ``fit.model.fit_model.FiT``) uses the module
names FlexDiT keeps (``x_embedder.proj``, ``t_embedder.mlp``, ``y_embedder``,
``blocks.N.{attn.qkv, attn.proj, mlp.fc1_g, mlp.fc1_x, mlp.fc2, adaLN_modulation}``,
``global_adaLN_modulation``, ``final_layer``), its tokens are ``(c, p1, p2)``-ordered and
its learned-sigma output is ``[eps | variance]``: the weights map one to one. What the
converter adds is the boundary between conventions:

- FiTv1 was trained with DiT's discrete diffusion: model time = DDPM step ``k`` in
  0..999 = ``1000 t`` (``time_scale=1000``), epsilon + learned variance output.
- FiTv2 was trained with SiT's linear interpolant, t = 0 noise, predicting
  ``data - noise``: ``time_flip=True``, ``time_scale=1``, ``output_scale=-1`` give
  flexgen's ``dx/dt`` at flexgen's t (t = 0 data).

Reference quirks that change outputs are explicit options, off by default:

- ``clamp_time`` (FiTv1): the released ``FiT.forward`` embeds ``min(k, 1)`` instead of
  the step ``k``, so every step >= 1 looks alike. The checkpoint was trained on raw
  steps; set it only to reproduce the reference forward bit for bit.
"""
import torch

from flexgen.registry import CHECKPOINT_CONVERTERS
from .base import CheckpointConverter, ConvertedCheckpoint, unwrap_state_dict

# Widths whose head count the released checkpoints fix (the weights cannot tell it).
HEADS_BY_WIDTH = {1152: 16, 2304: 24}


class _FiTConverter(CheckpointConverter):
    """Shared by both versions: ``converter(checkpoint, use_ema=True) ->
    ConvertedCheckpoint`` whose ``backbone`` holds every ``FlexDiT`` setting the
    converted state dict loads into with ``strict=True`` (architecture, RoPE, boundary).

    Args:
        num_heads: attention heads (the weights cannot tell); the released widths imply
            theirs (1152 -> 16, 2304 -> 24). Otherwise ``backbone`` has no ``num_heads``
            and the config's value stands.
        patch_size: the patch size (2 for every release; the token width
            ``C * p * p`` alone cannot separate ``C`` from ``p``).
        rope: ``AxialRoPE2D`` settings over FiT's (``theta=10000``, ``layout='fit'``), e.g.
            ``dict(rule=dict(type='NTKAware', ori_max_pe_len=16, decouple=True))`` to sample
            beyond the training grid, ``max_pe_len=(h, w)`` for the reference's offline
            tables, ``scale_in_training=True`` for FiTv2's HR fine-tuning (online RoPE).
        attn_backend: how attention is computed (``'sdpa'``; ``'padded'`` is FiT's own
            masked computation, same numbers).
        exclude: name substrings of tensors to leave out of the converted state dict, so
            that a non-strict load (mmengine's ``load_from``) keeps FlexDiT's fresh
            initialisation for them. FiTv2's high-resolution fine-tuning starts from
            FiTv2 with ``('x_embedder', 'bias', 'LN', 'final_layer')`` re-initialised (the
            reference's ``ignore_keys``; 'LN' matches every ``adaLN_modulation``).
    """

    name = None

    def __init__(self, num_heads=None, patch_size=2, rope=None, attn_backend='sdpa',
                 exclude=()):
        self.num_heads, self.patch_size = num_heads, patch_size
        self.rope, self.attn_backend = dict(rope or {}), attn_backend
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)

    # ------------------------------------------------------------------ checks
    def expected_keys(self, depth, lora):
        keys = ['x_embedder.proj.weight', 'x_embedder.proj.bias',
                't_embedder.mlp.0.weight', 't_embedder.mlp.0.bias',
                't_embedder.mlp.2.weight', 't_embedder.mlp.2.bias',
                'y_embedder.embedding_table.weight',
                'final_layer.linear.weight', 'final_layer.linear.bias',
                'final_layer.adaLN_modulation.1.weight', 'final_layer.adaLN_modulation.1.bias']
        if lora:
            keys += ['global_adaLN_modulation.1.weight', 'global_adaLN_modulation.1.bias']
        block = ['attn.qkv', 'attn.proj', 'mlp.fc1_g', 'mlp.fc1_x', 'mlp.fc2',
                 'adaLN_modulation.1'] + (['adaLN_modulation.2'] if lora else [])
        for i in range(depth):
            for name in block:
                keys += [f'blocks.{i}.{name}.weight', f'blocks.{i}.{name}.bias']
        return keys

    def check_keys(self, state_dict, depth, lora):
        expected = set(self.expected_keys(depth, lora))
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise KeyError(f'{self.name} converter: the checkpoint does not look like a '
                           f'{self.name} state dict (depth {depth}): missing keys '
                           f'{missing[:8]}{" ..." if len(missing) > 8 else ""}, unexpected '
                           f'keys {unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}')

    # ------------------------------------------------------------------ conversion
    def infer_backbone(self, state_dict):
        """The FlexDiT config of a FiT state dict (shapes -> sizes)."""
        width, token_width = state_dict['x_embedder.proj.weight'].shape
        p = self.patch_size
        if token_width % (p * p):
            raise ValueError(f'{self.name} converter: token width {token_width} is not '
                             f'C * {p} * {p}; pass the right patch_size')
        in_channels = token_width // (p * p)
        depth = 1 + max((int(k.split('.')[1]) for k in state_dict if k.startswith('blocks.')),
                        default=-1)
        if depth == 0:
            raise KeyError(f'{self.name} converter: no blocks.N.* keys in the checkpoint')
        num_heads = self.num_heads or HEADS_BY_WIDTH.get(width)
        out_width = state_dict['final_layer.linear.weight'].shape[0]
        if out_width not in (p * p * in_channels, 2 * p * p * in_channels):
            raise ValueError(f'{self.name} converter: final_layer.linear has {out_width} '
                             f'outputs, expected {p * p * in_channels} or '
                             f'{2 * p * p * in_channels}')
        hidden = state_dict['blocks.0.mlp.fc1_g.weight'].shape[0]
        mlp = dict(type='SwiGLUMlp')
        if hidden == int(4.0 * width):
            mlp['large'] = True
        elif hidden != int(4.0 * width) * 2 // 3:
            mlp['hidden_features'] = hidden
        rope = dict(dict(type='AxialRoPE2D', theta=10000.0, layout='fit'), **self.rope)
        backbone = dict(
            in_channels=in_channels, patch_size=p, hidden_size=width,
            depth=depth, mlp_ratio=4.0,
            num_classes=state_dict['y_embedder.embedding_table.weight'].shape[0] - 1,
            learn_sigma=out_width == 2 * p * p * in_channels, mlp=mlp, pos_embed=None,
            rope=rope, attn_backend=self.attn_backend)
        if num_heads is not None:  # otherwise the config's value stands
            backbone['num_heads'] = num_heads
        lora = 'blocks.0.adaLN_modulation.2.weight' in state_dict
        if lora:
            backbone['modulation'] = dict(
                type='AdaLNLoRA', rank=state_dict['blocks.0.adaLN_modulation.1.weight'].shape[0])
            backbone['global_modulation'] = dict(type='AdaLNZero')
        backbone.update(self.time_settings())
        return backbone

    def time_settings(self):
        raise NotImplementedError

    def matches(self, checkpoint):
        """Whether ``checkpoint`` is a reference FiT network of this version."""
        source = unwrap_state_dict(checkpoint)
        weight = source.get('x_embedder.proj.weight')
        return (isinstance(weight, torch.Tensor) and weight.dim() == 2
                and 'blocks.0.mlp.fc1_g.weight' in source
                and ('blocks.0.adaLN_modulation.2.weight' in source) == (self.name == 'FiTv2'))

    def __call__(self, checkpoint, use_ema=True):
        """A reference checkpoint (plain state dict, or ``{'ema': ...}`` / ``{'model': ...}``
        wrappers) -> :class:`ConvertedCheckpoint`."""
        source = unwrap_state_dict(checkpoint, use_ema)
        if 'x_embedder.proj.weight' not in source:
            raise KeyError(f'{self.name} converter: no x_embedder.proj.weight in the '
                           f'checkpoint (keys start with {sorted(source)[:4]})')
        backbone = self.infer_backbone(source)
        self.check_keys(source, backbone['depth'], 'global_modulation' in backbone)
        # Same module names and token layout: the tensors carry over unchanged.
        converted = {k: v for k, v in source.items()
                     if not any(pattern in k for pattern in self.exclude)}
        # ori_max_pe_len: side of the pre-training grid in patches (256 x 256 images),
        # the L of every RoPE extrapolation rule.
        info = dict(ori_max_pe_len=16, excluded=sorted(set(source) - set(converted)))
        return ConvertedCheckpoint(converted, backbone, info)


@CHECKPOINT_CONVERTERS.register_module(name='FiTv1')
class FiTv1Converter(_FiTConverter):
    """FiT-XL/2 (``InfImagine/FiT``, ``FiTv1_xl/model_ema.bin``): DDPM epsilon + learned
    variance, model time = DDPM step = ``1000 t``.

    Args:
        clamp_time: reproduce the reference forward's ``min(k, 1)`` on the embedded step
            (FlexDiT ``time_max=1``). For parity checks only: never train or sample with it.
    """

    name = 'FiTv1'

    def __init__(self, clamp_time=False, **kwargs):
        super().__init__(**kwargs)
        self.clamp_time = clamp_time

    def infer_backbone(self, state_dict):
        backbone = super().infer_backbone(state_dict)
        if 'global_modulation' in backbone:
            raise KeyError('FiTv1 converter: the checkpoint has AdaLN-LoRA keys '
                           '(blocks.0.adaLN_modulation.2.*): it is a FiTv2 checkpoint '
                           '(--from fitv2)')
        return backbone

    def time_settings(self):
        settings = dict(time_scale=1000.0, time_flip=False, output_scale=1.0)
        if self.clamp_time:
            settings['time_max'] = 1.0
        return settings


@CHECKPOINT_CONVERTERS.register_module(name='FiTv2')
class FiTv2Converter(_FiTConverter):
    """FiTv2-XL/2 and -3B/2 (``InfImagine/FiTv2``; also the HR fine-tunes): SiT's linear
    interpolant with t = 0 noise and ``data - noise`` velocity, QK LayerNorm, AdaLN-LoRA
    plus global adaLN."""

    name = 'FiTv2'

    def infer_backbone(self, state_dict):
        backbone = super().infer_backbone(state_dict)
        if 'global_modulation' not in backbone:
            raise KeyError('FiTv2 converter: no blocks.0.adaLN_modulation.2.weight (AdaLN-LoRA)'
                           ' in the checkpoint; a FiTv1 checkpoint needs --from fitv1')
        backbone['qk_norm'] = 'layernorm'
        return backbone

    def time_settings(self):
        return dict(time_scale=1.0, time_flip=True, output_scale=-1.0)
