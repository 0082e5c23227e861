"""The block contract: what :class:`~flexgen.models.backbones.FlexDiT` gives the blocks it
stacks and what it expects of them.

A block is a registered ``nn.Module``, best a subclass of :class:`TransformerBlock`:

- **It receives** (:func:`build_block`) ``hidden_size`` and ``num_heads``, always, and each
  of the backbone's shared options ``mlp``, ``qk_norm``, ``modulation`` and
  ``attn_backend`` (:data:`SHARED_OPTIONS`) only when its constructor has a parameter of
  that name (or ``**kwargs``) and its own config does not set it.
- **It owns** every layer it computes with (norms, attention, MLP, its modulation); their
  names are its state-dict keys.
- **It declares** ``modulation_chunks``: the width of its adaptive-norm modulation in
  units of ``hidden_size`` (6 for DiT's block), computed by its ``adaLN_modulation``
  layer. A global modulation (FiTv2) is built with as many chunks; ``None``: the block
  has no such layer and takes no global modulation.
- **It initialises itself**: the backbone first gives every ``nn.Linear`` DiT's default
  (xavier-uniform weight, zero bias), then calls the block's ``init_weights()``. The
  default initialises ``adaLN_modulation`` (:class:`~flexgen.models.layers.AdaLNZero`
  and ``AdaLNLoRA`` zero their output layer, so the block starts as the identity:
  adaLN-Zero); a block with other layers to initialise overrides it.
- **Its forward** is ``forward(x, c, batch, rope, extra_modulation)``: ``x`` ``[N, D]``
  the tokens of the jagged :class:`~flexgen.structures.TokenBatch` ``batch``, ``c``
  ``[B, D]`` each image's conditioning, ``rope`` the RoPE tables (or ``None``), and
  ``extra_modulation`` ``[B, modulation_chunks * D]``, the global modulation to add to the
  block's own; the backbone passes it only when it has one (a block without global
  modulation is called with four arguments). Arguments are positional: mmengine's
  activation checkpointing passes no keywords. It returns the new ``x``.
"""
import inspect

import torch.nn as nn

from flexgen.registry import MODELS

#: The backbone options every block may take, by name.
SHARED_OPTIONS = ('mlp', 'qk_norm', 'modulation', 'attn_backend')


class TransformerBlock(nn.Module):
    """Base class of FlexDiT's blocks (see the module docstring for the contract)."""

    modulation_chunks = None

    def init_weights(self):
        """Initialise what the backbone's default does not: here the modulation layer
        (zero output), when the block has one."""
        if self.modulation_chunks is not None:
            self.adaLN_modulation.init_weights()

    def modulations(self, c, extra_modulation=None):
        """The ``modulation_chunks`` chunks ``[B, D]`` of ``adaLN_modulation(c)`` plus the
        global modulation, when one is given."""
        modulation = self.adaLN_modulation(c)
        if extra_modulation is not None:
            modulation = modulation + extra_modulation
        return modulation.chunk(self.modulation_chunks, dim=-1)

    def forward(self, x, c, batch, rope=None, extra_modulation=None):
        raise NotImplementedError(f'{type(self).__name__} does not implement forward')


def takes_argument(cls, name) -> bool:
    """Whether ``cls(name=...)`` is accepted by the constructor's signature."""
    params = inspect.signature(cls).parameters
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def build_block(cfg, hidden_size, num_heads, **shared):
    """A block from its config: ``hidden_size`` and ``num_heads`` always; each of the
    ``shared`` options (:data:`SHARED_OPTIONS`) when the block's constructor takes it and
    the config does not set it."""
    cfg = dict(cfg)
    unknown = set(shared) - set(SHARED_OPTIONS)
    if unknown:
        raise ValueError(f'build_block: {sorted(unknown)} are not shared block options '
                         f'{SHARED_OPTIONS}')
    cls = MODELS.get(cfg['type']) if isinstance(cfg.get('type'), str) else cfg.get('type')
    for name, value in shared.items():
        if name not in cfg and cls is not None and takes_argument(cls, name):
            cfg[name] = value
    return MODELS.build(dict(cfg, hidden_size=hidden_size, num_heads=num_heads))
