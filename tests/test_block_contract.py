"""The contract between FlexDiT and its parts (flexgen.models.blocks.base): blocks written
only from it build, initialise and run; the other parts are registered and replaceable;
and FlexDiT's seeded initialisation is DiT's procedure, draw for draw."""
import pytest
import torch
import torch.nn as nn

import flexgen
from flexgen.models import FlexDiT
from flexgen.models.blocks import TransformerBlock
from flexgen.models.layers import Attention, LabelEmbedder, gate, modulate
from flexgen.registry import MODELS
from flexgen.structures import patchify

flexgen.register_all_modules()

TINY = dict(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            pos_embed=None, rope=dict(type='AxialRoPE2D'))


def inputs(seed=0, sizes=((2, 3), (4, 4), (3, 1))):
    g = torch.Generator().manual_seed(seed)
    batch = patchify([torch.randn(4, 2 * h, 2 * w, generator=g) for h, w in sizes], 2)
    return (batch, torch.rand(len(sizes), generator=g, dtype=torch.float64),
            torch.randint(0, 10, (len(sizes),), generator=g))


@MODELS.register_module(force=True)
class _ContractResidualBlock(TransformerBlock):
    """Only what the contract asks for: no modulation at all, and a constructor that names
    none of the backbone's shared options (``x + c + Attn(LN(x))``, c added per image)."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)

    def forward(self, x, c, batch, rope=None, extra_modulation=None):
        return x + batch.per_token(c) + self.attn(self.norm(x), batch, rope)


@MODELS.register_module(force=True)
class _ContractGatedBlock(TransformerBlock):
    """A two-chunk modulation, ``x += g * Attn(LN(x) * (1 + s))``, taking only the
    ``qk_norm`` and ``modulation`` shared options, with an extra initialisation."""

    modulation_chunks = 2

    def __init__(self, hidden_size, num_heads, qk_norm=None, modulation=dict(type='AdaLNZero')):
        super().__init__()
        self.qk_norm = qk_norm
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.adaLN_modulation = MODELS.build(dict(modulation, hidden_size=hidden_size,
                                                  num_chunks=self.modulation_chunks))
        self.layer_scale = nn.Parameter(torch.empty(hidden_size))

    def init_weights(self):
        super().init_weights()
        nn.init.ones_(self.layer_scale)

    def forward(self, x, c, batch, rope=None, extra_modulation=None):
        scale, g = self.modulations(c, extra_modulation)
        h = self.attn(modulate(self.norm(x), torch.zeros_like(scale), scale, batch), batch, rope)
        return x + gate(h * self.layer_scale, g, batch)


def test_a_block_without_modulation_or_shared_options_builds_and_runs():
    model = MODELS.build(dict(type='FlexDiT', block=dict(type='_ContractResidualBlock'),
                              **TINY))
    block = model.blocks[0]
    # the backbone's default initialisation reached the block's linears
    assert torch.equal(block.attn.qkv.bias, torch.zeros_like(block.attn.qkv.bias))
    batch, t, y = inputs()
    with torch.no_grad():
        out = model(batch, t, y)
    assert out.shape == (batch.tokens.shape[0], 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match='global_modulation needs blocks that declare '
                                         'modulation_chunks.*_ContractResidualBlock'):
        MODELS.build(dict(type='FlexDiT', block=dict(type='_ContractResidualBlock'),
                          global_modulation=dict(type='AdaLNZero'), **TINY))


def test_a_block_gets_only_the_options_it_names_and_initialises_itself():
    model = MODELS.build(dict(type='FlexDiT', block=dict(type='_ContractGatedBlock'),
                              qk_norm='layernorm', global_modulation=dict(type='AdaLNZero'),
                              **TINY))
    block = model.blocks[0]
    assert block.qk_norm == 'layernorm'  # taken from the backbone: the constructor names it
    assert torch.equal(block.layer_scale, torch.ones(32))  # its own init_weights ran
    last = block.adaLN_modulation[-1]
    assert not last.weight.any() and not last.bias.any()  # the base zeroed its modulation
    assert model.global_adaLN_modulation[-1].out_features == 2 * 32  # as many chunks
    batch, t, y = inputs()
    with torch.no_grad():  # zero gates: every block starts as the identity
        hidden = model.x_embedder(batch.tokens)
        assert torch.equal(block(hidden, model.condition(t, y), batch, None,
                                 model.global_adaLN_modulation(model.condition(t, y))), hidden)
    # the block's own config wins over the backbone's shared option
    own = MODELS.build(dict(type='FlexDiT', qk_norm='layernorm',
                            block=dict(type='_ContractGatedBlock', qk_norm='rmsnorm'), **TINY))
    assert own.blocks[0].qk_norm == 'rmsnorm'


@MODELS.register_module(force=True)
class _ContractLabelTable(LabelEmbedder):
    """A label part with its own initialisation (all rows equal: labels ignored)."""

    def init_weights(self):
        nn.init.constant_(self.embedding_table.weight, 0.5)


def test_embedders_and_final_layer_are_registered_parts():
    model = MODELS.build(dict(type='FlexDiT', y_embedder=dict(type='_ContractLabelTable'),
                              t_embedder=dict(type='TimestepEmbedder',
                                              frequency_embedding_size=64),
                              **TINY))
    assert model.y_embedder.embedding_table.weight.shape == (11, 32)
    assert torch.equal(model.y_embedder.embedding_table.weight, torch.full((11, 32), 0.5))
    assert model.t_embedder.mlp[0].in_features == 64
    assert model.final_layer.linear.out_features == 2 * 2 * 4
    default = FlexDiT(**TINY)
    assert [type(m).__name__ for m in (default.x_embedder, default.t_embedder,
                                       default.y_embedder, default.final_layer)] == \
        ['PatchEmbed', 'TimestepEmbedder', 'LabelEmbedder', 'FinalLayer']
    with pytest.raises(TypeError, match=r"^`FinalLayer` \(model registry\): unexpected "
                                        r"argument 'bias'"):
        MODELS.build(dict(type='FlexDiT', final_layer=dict(type='FinalLayer', bias=False),
                          **TINY))


def dit_initialisation(model):
    """DiT's initialize_weights as a procedure of its own (facebookresearch/DiT models.py):
    xavier-uniform linears with zero biases in module order, the label table N(0, 0.02),
    then the timestep MLP's weights N(0, 0.02); zero adaLN and output layers."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    zeroed = [block.adaLN_modulation[-1] for block in model.blocks]
    if model.global_adaLN_modulation is not None:
        zeroed.append(model.global_adaLN_modulation[-1])
    zeroed += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    for layer in zeroed:
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


@pytest.mark.parametrize('settings', [
    dict(TINY, pos_embed=dict(type='SinCos2D'), rope=None, learn_sigma=True),  # DiT
    dict(TINY, mlp=dict(type='SwiGLUMlp'), qk_norm='layernorm',  # FiTv2
         modulation=dict(type='AdaLNLoRA', rank=8), global_modulation=dict(type='AdaLNZero')),
    dict(TINY, qk_norm=dict(type='layernorm_affine', eps=1e-5)),  # NiT
])
def test_seeded_initialisation_is_dits_draw_for_draw(settings, monkeypatch):
    torch.manual_seed(7)
    model = FlexDiT(**settings)
    after_model = torch.randn(4)
    monkeypatch.setattr(FlexDiT, 'initialize_weights', lambda self: None)
    torch.manual_seed(7)
    reference = FlexDiT(**settings)  # the same construction draws, no initialisation
    dit_initialisation(reference)
    assert torch.equal(torch.randn(4), after_model)  # the same number of draws
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    for key in state:
        assert torch.equal(state[key], expected[key]), key
