"""Official DiT (Peebles & Xie 2023) and SiT (Ma et al. 2024) checkpoints -> ``FlexDiT``.

Both references share one network (``models.py``: ``DiT`` / ``SiT``) and one state-dict
layout, and flexgen's ``FlexDiT`` keeps its key names, so the conversion is nearly the
identity. Three things differ:

- ``x_embedder.proj.weight``: the reference's ``Conv2d(C, D, p, stride=p)`` weight
  ``[D, C, p, p]`` is flexgen's ``Linear`` on ``(c, p1, p2)`` patch tokens: viewed as
  ``[D, C*p*p]`` (same order, a reshape).
- ``final_layer.linear``: the reference unpatchifies output feature
  ``(p1*p + p2)*C_out + c`` (channel fastest, ``(p1, p2, c)``); flexgen reads ``(c, p1, p2)``
  (channel slowest, so the first ``p*p*C`` columns are the prediction and the rest the
  learned variance). The rows (and bias) are permuted accordingly.
- ``pos_embed``: the reference stores its fixed 2-D sin-cos table (for its one square
  grid); flexgen's ``SinCos2D`` computes the same table for any grid, so it is dropped
  after checking that it is that table.

The boundary settings make the flexgen model, fed flexgen's time ``t`` (0 data, 1 noise),
reproduce the reference network exactly:

- DiT feeds integer diffusion steps ``k`` in 0..999 (999 noisiest) to the sinusoid:
  ``time_scale=1000`` with ``t = k / 1000``; its output (epsilon, learned variance) is used
  as is.
- SiT feeds ``s`` in [0, 1] with ``s = 0`` noise, unscaled, and predicts the velocity
  ``d x / d s``: ``time_flip=True`` (``s = 1 - t``), ``time_scale=1`` and
  ``output_scale=-1`` (``d x / d t = -d x / d s``).
"""
import math
import warnings

import torch

from flexgen.registry import CHECKPOINT_CONVERTERS
from flexgen.structures import grid_positions
from .base import CheckpointConverter, ConvertedCheckpoint, unwrap_state_dict

# Heads of the reference model sizes (DiT Table 1); a width not listed needs num_heads
# from the config (the weights do not reveal it).
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}

# pos_embed checks: a table equal to the sin-cos one up to float32 rounding is dropped
# silently. The references' EMA also updates the (frozen) table, and float32 rounding of
# ``ema.mul_(d).add_(p, alpha=1 - d)`` walks it to a fixed point up to ~1.7e-4 away
# (simulated on DiT-XL/2's table at d = 0.9999: reached after ~2.8K steps); such a table
# is dropped with a warning, anything further off is not a sin-cos table and is refused.
POS_EMBED_EXACT = 1e-6
POS_EMBED_DRIFT = 1e-3


def expected_keys(depth: int, pos_embed: bool = True) -> set:
    """The key set of a reference DiT / SiT network of ``depth`` blocks."""
    keys = {f'{name}.{kind}' for kind in ('weight', 'bias') for name in (
        'x_embedder.proj', 't_embedder.mlp.0', 't_embedder.mlp.2', 'final_layer.linear',
        'final_layer.adaLN_modulation.1')}
    keys.add('y_embedder.embedding_table.weight')
    if pos_embed:
        keys.add('pos_embed')
    for i in range(depth):
        keys.update(f'blocks.{i}.{name}.{kind}' for kind in ('weight', 'bias') for name in (
            'attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2', 'adaLN_modulation.1'))
    return keys


def _depth(state_dict: dict) -> int:
    return 1 + max((int(k.split('.')[1]) for k in state_dict
                    if k.startswith('blocks.') and k.split('.')[1].isdigit()), default=-1)


def key_problems(state_dict: dict) -> str:
    """'' if ``state_dict`` has exactly the keys of a reference DiT / SiT network (with or
    without ``pos_embed``), else what is missing or unexpected."""
    expected = expected_keys(_depth(state_dict), 'pos_embed' in state_dict)
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if not (missing or unexpected):
        return ''
    return (f'missing keys {missing[:6]}{" ..." if len(missing) > 6 else ""}, unexpected keys '
            f'{unexpected[:6]}{" ..." if len(unexpected) > 6 else ""}')


def is_official_dit(state_dict: dict) -> bool:
    """Whether ``state_dict`` is a reference DiT / SiT network: its exact key set, with the
    patch embedding still a 4-D convolution weight (flexgen's is a 2-D linear weight)."""
    weight = state_dict.get('x_embedder.proj.weight')
    return (isinstance(weight, torch.Tensor) and weight.dim() == 4
            and not key_problems(state_dict))


def sincos_table(hidden_size: int, grid: int) -> torch.Tensor:
    """flexgen's ``SinCos2D`` on a square ``grid x grid`` patch grid, ``[grid*grid, D]``."""
    from flexgen.position_encodings.sincos import SinCos2D
    return SinCos2D(hidden_size)(grid_positions(torch.tensor([[grid, grid]])))


def final_rows_to_flexgen(tensor: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reorder the output rows of the final linear from ``(p1, p2, c)`` to ``(c, p1, p2)``."""
    area = patch_size * patch_size
    out_channels = tensor.shape[0] // area
    rest = tuple(tensor.shape[1:])
    return (tensor.reshape((area, out_channels) + rest).transpose(0, 1)
            .reshape((area * out_channels,) + rest).contiguous())


class DiTFamilyConverter(CheckpointConverter):
    """Reference ``DiT`` / ``SiT`` network state dict -> ``FlexDiT`` state dict and settings.

    ``converter(checkpoint, use_ema=True) -> ConvertedCheckpoint``; ``checkpoint`` is what
    the reference saves (see :func:`unwrap_state_dict`), already loaded as tensors.

    Args:
        num_heads: attention heads. The weights do not tell them; the reference widths
            (384, 768, 1024, 1152 -> 6, 12, 16, 16) are known, any other width leaves
            ``num_heads`` out of the settings (the config gives it).
    """

    #: FlexDiT settings that map flexgen's time and output onto the reference network.
    boundary: dict = {}
    name = 'DiT'

    def __init__(self, num_heads=None):
        self.num_heads = num_heads

    def matches(self, checkpoint: dict) -> bool:
        return is_official_dit(unwrap_state_dict(checkpoint))

    def __call__(self, checkpoint: dict, use_ema: bool = True) -> ConvertedCheckpoint:
        source = unwrap_state_dict(checkpoint, use_ema)
        problems = key_problems(source)
        if problems:
            raise KeyError(f'{self.name} converter: not a reference {self.name} state dict '
                           f'({problems})')
        proj = source['x_embedder.proj.weight']
        if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
            raise ValueError(f'{self.name} converter: x_embedder.proj.weight has shape '
                             f'{tuple(proj.shape)}, expected a Conv2d weight [D, C, p, p] '
                             '(is it already a flexgen state dict?)')
        hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        depth = _depth(source)
        out_rows = source['final_layer.linear.weight'].shape[0]
        if out_rows not in (patch ** 2 * in_channels, 2 * patch ** 2 * in_channels):
            raise ValueError(f'{self.name} converter: final_layer.linear.weight has {out_rows} '
                             f'rows; expected p*p*C = {patch ** 2 * in_channels} or twice '
                             'that (learned sigma)')
        learn_sigma = out_rows == 2 * patch ** 2 * in_channels

        converted, info = {}, {}
        for key, value in source.items():
            if key == 'pos_embed':
                info.update(self._check_pos_embed(value, hidden))
            elif key == 'x_embedder.proj.weight':
                converted[key] = value.reshape(hidden, -1).contiguous()
            elif key in ('final_layer.linear.weight', 'final_layer.linear.bias'):
                converted[key] = final_rows_to_flexgen(value, patch)
            else:
                converted[key] = value
        backbone = dict(in_channels=in_channels, patch_size=patch, hidden_size=hidden,
                        depth=depth,
                        num_classes=source['y_embedder.embedding_table.weight'].shape[0] - 1,
                        learn_sigma=learn_sigma, pos_embed=dict(type='SinCos2D'), rope=None,
                        **self.boundary)
        num_heads = self.num_heads or HEADS_BY_WIDTH.get(hidden)
        if num_heads is not None:
            backbone['num_heads'] = num_heads
        return ConvertedCheckpoint(converted, backbone, info)

    def _check_pos_embed(self, table: torch.Tensor, hidden: int) -> dict:
        tokens = table.shape[-2]
        grid = math.isqrt(tokens)
        if table.shape[-1] != hidden or grid * grid != tokens:
            raise ValueError(f'{self.name} converter: pos_embed has shape {tuple(table.shape)}; '
                             f'expected [1, g*g, {hidden}] (a square sin-cos table)')
        deviation = (table.reshape(tokens, hidden).float() -
                     sincos_table(hidden, grid)).abs().max().item()
        if deviation > POS_EMBED_DRIFT:
            raise ValueError(
                f'{self.name} converter: pos_embed differs from the 2-D sin-cos table by up '
                f'to {deviation:.3g} (> {POS_EMBED_DRIFT}): this checkpoint did not use '
                "the reference's fixed table, and FlexDiT's SinCos2D cannot reproduce it")
        if deviation > POS_EMBED_EXACT:
            warnings.warn(
                f'{self.name} converter: pos_embed differs from the exact sin-cos table by '
                f'up to {deviation:.3g} (float32 rounding drift of the EMA on the frozen '
                'table); flexgen uses the exact table, so its outputs differ from the '
                "reference's at about that scale")
        return dict(grid_size=grid, pos_embed_max_deviation=deviation)


@CHECKPOINT_CONVERTERS.register_module(name='DiT')
class DiTConverter(DiTFamilyConverter):
    """facebookresearch/DiT (``DiT-XL-2-256x256.pt`` ...): integer steps ``k = 1000 t``,
    output epsilon + learned variance used as is."""
    name = 'DiT'
    boundary = dict(time_scale=1000.0, time_flip=False, output_scale=1.0)


@CHECKPOINT_CONVERTERS.register_module(name='SiT')
class SiTConverter(DiTFamilyConverter):
    """willisma/SiT (``SiT-XL-2-256.pt`` ...): time ``s = 1 - t`` fed unscaled, velocity
    ``d x / d s`` negated into flexgen's ``d x / d t``. The released head keeps its unused
    learned-variance rows (``learn_sigma=True``); flexgen's transports ignore them."""
    name = 'SiT'
    boundary = dict(time_scale=1.0, time_flip=True, output_scale=-1.0)

