"""2D axial rotary position embedding (RoFormer, Su et al. 2021) in the FiT / NiT form,
with extrapolation rules (position interpolation, NTK, YaRN, ...) for unseen sizes.

Each attention head's ``head_dim`` channels split into two halves of ``d = head_dim / 2``;
one half rotates with the token's row, the other with its column. Inside a half, channels
rotate in interleaved pairs ``(x0, x1), (x2, x3), ...`` (GPT-J style), pair ``k`` by
``position * w_k``, ``w_k = theta^(-2k/d)``. The angle between a query at ``(r, c)`` and a
key at ``(r', c')`` then depends only on ``(r - r', c - c')``.

Layouts (which half rotates with which axis):

- ``'fit'``: channels ``[0, d)`` rotate with the ROW (height) index, ``[d, 2d)`` with the
  COLUMN (width) index (FiT / FiTv2: ``concat(freqs_h[row], freqs_w[col])``);
- ``'nit'``: channels ``[0, d)`` rotate with the COLUMN index, ``[d, 2d)`` with the ROW
  index (NiT: its first half is indexed by ``meshgrid(..., indexing='xy')[0]``).

Index modes (which (row, col) a token gets; token ``k`` of an ``h x w`` image, row-major):

- ``'rowcol'``: the true position ``(k // w, k % w)``;
- ``'nit_legacy'``: NiT's released code, ``(k // h, k % h)``: the image is treated as its
  transposed ``w x h`` grid, for positions and for the extrapolation targets alike. With
  layout ``'nit'`` this is exactly NiT: first half ``pos_a = k % h`` (scaled from the
  height), second half ``pos_b = k // h`` (scaled from the width). Equal to ``'rowcol'``
  for square images; needed to reproduce NiT's official weights on non-square ones.
"""
from collections import OrderedDict

import torch
import torch.nn as nn

from flexgen.registry import POSITION_ENCODINGS

from flexgen.structures import host_to_device

from .rope_scaling import base_frequencies, build_rope_rule
# the rule families register themselves in POSITION_ENCODINGS on import
from . import rope_interpolation, rope_ntk, rope_proportional, rope_yarn  # noqa: F401,E402

LAYOUTS = ('fit', 'nit')
INDEX_MODES = ('rowcol', 'nit_legacy')


def rotate_half(x):
    """Interleaved pairs: ``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack([-x[..., 1], x[..., 0]], dim=-1).flatten(-2)


def apply_rotary(x, cos, sin):
    """Rotate ``x`` ``[N, heads, head_dim]`` by per-token angles ``cos, sin`` ``[N, head_dim]``.

    A rule's attention factor is already inside ``cos`` and ``sin`` (as in FiT / NiT), so
    rotating ``q`` and ``k`` (never ``v``) is all attention has to do."""
    dtype = x.dtype
    x = x.float()
    return (x * cos[:, None] + rotate_half(x) * sin[:, None]).to(dtype)


def _pair(value, name):
    if isinstance(value, int):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f'AxialRoPE2D: {name} must be a positive int or (h, w), got {value!r}')
    return tuple(value)


@POSITION_ENCODINGS.register_module()
class AxialRoPE2D(nn.Module):
    """2D axial RoPE: ``forward(batch) -> (cos, sin)``, each ``[N, head_dim]`` float32.

    Args:
        head_dim: channels per attention head (a multiple of 4).
        theta: RoPE base (10000).
        layout: ``'fit'`` (first half = row) or ``'nit'`` (first half = column).
        index_mode: ``'rowcol'`` or ``'nit_legacy'`` (see the module docstring).
        rule: an extrapolation rule config, e.g. ``dict(type='YaRN', ori_max_pe_len=16,
            decouple=True)``; ``type`` may also be a reference name (``'dynntk'``,
            ``'ntk-aware'``, ``'yarn'``, ``'ntkpro2'``, ...). ``None``: plain RoPE.
        max_pe_len: the target grid ``(h, w)`` (or one int) every image is scaled for, as the
            references build their tables (``max_pe_len_h / _w``; their samplers set it to
            the one sampling size of the batch). ``None`` (default): each image's own size,
            which equals the reference on its same-size sampling batches and keeps every
            image of a mixed batch independent of the others.
        scale_in_training: apply the rule in training mode too (per image; FiTv2's
            high-resolution fine-tuning, ``online_rope``). By default the rule acts in eval
            mode only (sampling) and training sees plain RoPE, as the references train.

    Frequencies are computed in float64 once per distinct target grid (cached by
    ``(h, w)``), cast to float32; angles, cos and sin are float32 whatever the model's
    dtype (no floating buffer, so ``model.to(bfloat16)`` leaves them intact). A rule's
    attention factor is multiplied onto cos and sin (logits scale by its square).
    """

    def __init__(self, head_dim, theta=10000.0, layout='fit', index_mode='rowcol', rule=None,
                 max_pe_len=None, scale_in_training=False, cache_size=1024):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f'AxialRoPE2D: head_dim {head_dim} must be divisible by 4 '
                             '(two axes of rotating pairs)')
        if layout not in LAYOUTS:
            raise ValueError(f'AxialRoPE2D: layout {layout!r} is not one of {LAYOUTS}')
        if index_mode not in INDEX_MODES:
            raise ValueError(f'AxialRoPE2D: index_mode {index_mode!r} is not one of '
                             f'{INDEX_MODES}')
        self.head_dim, self.theta = head_dim, float(theta)
        self.axis_dim = head_dim // 2
        self.layout, self.index_mode = layout, index_mode
        self.rule = build_rope_rule(rule)
        self.max_pe_len = None if max_pe_len is None else _pair(max_pe_len, 'max_pe_len')
        self.scale_in_training = bool(scale_in_training)
        self.cache_size = cache_size
        self._tables = OrderedDict()   # (h, w) -> (row float64, col float64, factor)
        self._base = {}                # device -> float32 plain frequencies

    def set_rule(self, rule):
        """Swap the extrapolation rule (e.g. at sampling time, ``tools/sample.py
        --interpolation``); cached tables of the old rule are dropped."""
        self.rule = build_rope_rule(rule)
        self._tables.clear()

    # ------------------------------------------------------------------ tables
    def frequencies(self, h, w):
        """``(row_freqs, col_freqs, factor)`` (float64 ``[d/2]``, ``[d/2]``, float) for a
        target grid of ``h`` rows and ``w`` columns of the index grid (``nit_legacy``
        passes an image's sides swapped). Cached by ``(h, w)``."""
        key = (int(h), int(w))
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        if self.rule is None:
            base = base_frequencies(self.axis_dim, self.theta)
            value = (base, base, 1.0)
        else:
            value = self.rule.tables(key[0], key[1], self.axis_dim, self.theta)
        self._tables[key] = value
        if len(self._tables) > self.cache_size:
            self._tables.popitem(last=False)
        return value

    def base_frequencies(self, device):
        """Plain float32 frequencies on ``device`` (float64 then cast)."""
        device = torch.device(device)
        if device not in self._base:
            self._base[device] = base_frequencies(self.axis_dim, self.theta).float().to(device)
        return self._base[device]

    @property
    def active_rule(self):
        """The rule in force now (``None`` in training unless ``scale_in_training``)."""
        if self.rule is None or (self.training and not self.scale_in_training):
            return None
        return self.rule

    # ------------------------------------------------------------------ geometry
    def grid_sizes(self, sizes):
        """Per image ``(rows, cols)`` of the index grid: ``sizes``, or swapped for
        ``nit_legacy``."""
        sizes = torch.as_tensor(sizes, dtype=torch.long).reshape(-1, 2)
        return sizes.flip(1) if self.index_mode == 'nit_legacy' else sizes

    def positions(self, batch):
        """``[N, 2]`` (row, col) of every token in the index grid."""
        if self.index_mode == 'rowcol':
            return batch.positions
        # token k of an h x w image sits at (k // h, k % h) of the transposed grid
        local, rows = batch.local_index, batch.image_sizes[:, 0][batch.image_ids]
        return torch.stack([local // rows, local % rows], dim=1)

    def _per_image(self, batch, device):
        """Per-token (or shared) float32 frequencies and factor for the batch's images."""
        if self.max_pe_len is not None:
            h, w = self.grid_sizes(torch.tensor([self.max_pe_len]))[0].tolist()
            uniq, inverse = torch.tensor([[h, w]]), None
        elif batch is None:
            raise ValueError(f'AxialRoPE2D: rule {self.rule!r} scales by each image\'s size; '
                             'pass a TokenBatch (not bare positions) or set max_pe_len')
        else:
            uniq, inverse = torch.unique(self.grid_sizes(batch.sizes), dim=0,
                                         return_inverse=True)
        tables = [self.frequencies(h, w) for h, w in uniq.tolist()]
        rows = host_to_device(torch.stack([t[0] for t in tables]).float(), device)
        cols = host_to_device(torch.stack([t[1] for t in tables]).float(), device)
        factors = [t[2] for t in tables]
        if len(tables) == 1:
            factor = None if factors[0] == 1.0 else factors[0]
            return rows[0], cols[0], factor
        token = host_to_device(inverse, device)[batch.image_ids]
        factor = None
        if any(f != 1.0 for f in factors):
            factor = host_to_device(torch.tensor(factors, dtype=torch.float32), device)[token, None]
        return rows[token], cols[token], factor

    # ------------------------------------------------------------------ forward
    def _halves(self, rows, cols):
        halves = (rows, cols) if self.layout == 'fit' else (cols, rows)
        return torch.cat(halves, dim=1).repeat_interleave(2, dim=1)

    def angles(self, positions):
        """Plain-RoPE angles ``[N, head_dim]`` of (row, col) ``positions`` ``[N, 2]``:
        ``[row * w | col * w]`` (layout ``'fit'``) in interleaved pairs."""
        freqs = self.base_frequencies(positions.device)
        pos = positions.to(torch.float32)
        return self._halves(pos[:, 0:1] * freqs, pos[:, 1:2] * freqs)

    def forward(self, batch):
        """``batch``: a TokenBatch, or bare (row, col) positions ``[N, 2]`` (taken as given,
        whatever the index mode; a rule then needs ``max_pe_len``)."""
        is_batch = not torch.is_tensor(batch)
        positions = self.positions(batch) if is_batch else batch
        if self.active_rule is None:
            angles, factor = self.angles(positions), None
        else:
            rows, cols, factor = self._per_image(batch if is_batch else None,
                                                 positions.device)
            pos = positions.to(torch.float32)
            angles = self._halves(pos[:, 0:1] * rows, pos[:, 1:2] * cols)
        cos, sin = torch.cos(angles), torch.sin(angles)
        if factor is not None:
            cos, sin = cos * factor, sin * factor
        return cos, sin

    def attention_factors(self, batch):
        """Per image ``[B]`` float32: the factor inside cos and sin (attention logits are
        multiplied by its square). All ones without an active rule."""
        sizes = batch.sizes
        out = torch.ones(len(sizes), dtype=torch.float32)
        if self.active_rule is None:
            return out
        for i, (h, w) in enumerate(self.grid_sizes(sizes).tolist()):
            if self.max_pe_len is not None:
                h, w = self.grid_sizes(torch.tensor([self.max_pe_len]))[0].tolist()
            out[i] = self.frequencies(h, w)[2]
        return out

    def extra_repr(self):
        return (f'head_dim={self.head_dim}, theta={self.theta}, layout={self.layout!r}, '
                f'index_mode={self.index_mode!r}, rule={self.rule!r}, '
                f'max_pe_len={self.max_pe_len}, scale_in_training={self.scale_in_training}')
