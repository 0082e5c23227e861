"""NiT official weights in FlexDiT reproduce the reference network.

Golden fixtures (tests/fixtures/nit, meta.json tells everything): a tiny reference ``NiT``
(github.com/WZDTHU/NiT at 33ff1c7, run on CPU in float32 with a per-segment SDPA stand-in
for flash-attn's varlen kernel) with random weights, base and AdaLN-LoRA variants, and its
outputs on mixed square / non-square packs: the velocity, the REPA projector output of
the hidden state after block ``encoder_depth``, and a classifier-free-guidance pack. Here
the same weights go through the 'NiT' converter into a FlexDiT (+ the generator's REPA
head) fed flexgen's jagged batches; every output must match within 1e-5.
"""
import functools
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from safetensors.torch import load_file

import flexgen
from flexgen.apis.official import (backbone_mismatches, build_converter, load_official,
                                   matching_converters)
from flexgen.models import FlexDiT
from flexgen.models.converters.nit import NiTConverter
from flexgen.registry import CHECKPOINT_CONVERTERS, MODELS
from flexgen.samplers.guidance import ClassifierFreeGuidance
from flexgen.structures import TokenBatch, patchify, unpatchify

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FIXTURES = osp.join(ROOT, 'tests', 'fixtures')
TOLERANCE = 1e-5
NULL_LABEL = 1000
VARIANTS = ('base', 'adaln_lora')

flexgen.register_all_modules()


@functools.lru_cache(maxsize=None)
def fixture(variant):
    meta = json.loads(open(osp.join(FIXTURES, 'nit', 'meta.json')).read())
    info = next(v for v in meta['variants'] if v['name'] == variant)
    folder = osp.join(FIXTURES, 'nit')
    return (info, load_file(osp.join(folder, info['cases_file'])),
            load_file(osp.join(folder, info['model_file'])))


def all_cases():
    return [(v, c['name']) for v in VARIANTS for c in fixture(v)[0]['cases']]


def tiny_encoder(z_dim):
    """A frozen random timm ViT with ``z_dim`` features: REPAHead needs an encoder to exist
    (the projector's output, the fixture's ``zs``, does not depend on it)."""
    return dict(type='TimmViTEncoder', model_name='vit_tiny_patch16_224', img_size=32,
                model_kwargs=dict(embed_dim=z_dim, depth=1, num_heads=2))


def generator(variant, **converter_options):
    """The fixture's weights in a DiffusionGenerator: backbone + REPA head (eval mode)."""
    info, _, state_dict = fixture(variant)
    converted = NiTConverter(**converter_options)(state_dict)
    kwargs = info['constructor']['kwargs']
    model = MODELS.build(dict(
        type='DiffusionGenerator', backbone=dict(type='FlexDiT', **converted.backbone),
        transport=dict(type='RectifiedFlow'),
        autoencoder=dict(type='IdentityAutoencoder', channels=32),
        repa=dict(type='REPAHead', encoder=tiny_encoder(kwargs['z_dim']),
                  feature_block=kwargs['encoder_depth'], **converted.repa)))
    model.load_state_dict(converted.generator_state_dict(), strict=True)
    return model.eval(), converted


def inputs(variant, name):
    """(batch, t, y) of a case; flexgen's patchify of the image latents must give exactly
    the reference's packed tokens (row-major per image, images in hw_list order)."""
    _, cases, _ = fixture(variant)
    sizes = cases[f'{name}.hw_list'].long()
    latents = [cases[f'{name}.latent_{i}'] for i in range(len(sizes))]
    batch = patchify(latents, 1)
    assert torch.equal(batch.tokens, cases[f'{name}.x'].flatten(1))
    assert torch.equal(batch.sizes, sizes)
    assert torch.equal(batch.cu_seqlens, cases[f'{name}.cu_seqlens'])
    return batch, cases[f'{name}.t'], cases[f'{name}.y']


def max_error(actual, expected):
    return (actual - expected).abs().max().item()


# --------------------------------------------------------------------------- conversion
@pytest.mark.parametrize('variant', VARIANTS)
def test_converter_settings(variant):
    info, _, state_dict = fixture(variant)
    kwargs = info['constructor']['kwargs']
    converted = NiTConverter()(state_dict)
    backbone = converted.backbone
    assert (backbone['in_channels'], backbone['patch_size'], backbone['hidden_size'],
            backbone['depth'], backbone['num_heads'], backbone['num_classes']) == (
        32, 1, kwargs['hidden_size'], kwargs['depth'], kwargs['num_heads'], 1000)
    # NiT's own time is flexgen's: raw t in [0, 1], t = 0 data, velocity eps - x0.
    assert (backbone['time_scale'], backbone['time_flip'], backbone['output_scale']) == (
        1.0, False, 1.0)
    assert backbone['learn_sigma'] is False and backbone['pos_embed'] is None
    assert backbone['qk_norm'] == dict(type='layernorm_affine', eps=1e-5)
    assert backbone['rope'] == dict(type='AxialRoPE2D', theta=10000.0, layout='nit',
                                    index_mode='nit_legacy')
    lora = kwargs.get('use_adaln_lora', False)
    assert backbone['modulation'] == (dict(type='AdaLNLoRA', rank=kwargs['adaln_lora_dim'])
                                      if lora else dict(type='AdaLNZero'))
    # Every tensor arrives, the projector under REPAHead's names.
    assert converted.repa == dict(hidden_size=kwargs['hidden_size'],
                                  projector_dim=kwargs['projector_dim'],
                                  z_dims=[kwargs['z_dim']])
    assert len(converted.state_dict) + len(converted.repa_state_dict) == len(state_dict)
    for i in (0, 2, 4):
        assert torch.equal(converted.repa_state_dict[f'projectors.0.{i}.weight'],
                           state_dict[f'projector.{i}.weight'])
    assert torch.equal(converted.state_dict['x_embedder.proj.weight'],
                       state_dict['x_embedder.proj.weight'][:, :, 0, 0])
    model = FlexDiT(**backbone)
    model.load_state_dict(converted.state_dict, strict=True)
    assert sum(p.numel() for p in model.parameters()) + sum(
        v.numel() for v in converted.repa_state_dict.values()) == info['num_params']


@pytest.mark.parametrize('variant,name', all_cases())
def test_outputs_and_projector_match_the_reference(variant, name):
    model, _ = generator(variant)
    info, cases, _ = fixture(variant)
    batch, t, y = inputs(variant, name)
    with torch.no_grad():
        out, hidden = model.network(batch, t, y,
                                    feature_block=info['constructor']['kwargs']['encoder_depth'])
        zs = model.repa.project(hidden)[0]
    assert max_error(out, cases[f'{name}.out'].flatten(1)) <= TOLERANCE
    assert max_error(zs, cases[f'{name}.zs']) <= TOLERANCE
    for i, image in enumerate(unpatchify(out, batch.sizes, 1)):
        assert max_error(image, cases[f'{name}.out_{i}']) <= TOLERANCE
    for i, z in enumerate(batch.split(zs)):
        assert max_error(z.T.reshape(cases[f'{name}.zs_{i}'].shape),
                         cases[f'{name}.zs_{i}']) <= TOLERANCE
    # Without feature_block the backbone returns the same output alone.
    with torch.no_grad():
        assert torch.equal(model.network(batch, t, y), out)


@pytest.mark.parametrize('variant,name', all_cases())
def test_rope_positions_are_the_references(variant, name):
    """The recorded reference grid: row 0 (first rotary half) = k mod h, row 1 = k div h."""
    model, _ = generator(variant)
    batch, _, _ = inputs(variant, name)
    positions = model.backbone.rope.positions(batch)  # (row, col) of the index grid
    # layout 'nit': the first half rotates with the column, the second with the row.
    assert torch.equal(torch.stack([positions[:, 1], positions[:, 0]]),
                       fixture(variant)[1][f'{name}.rope_grid'])


@pytest.mark.parametrize('variant,name', all_cases())
def test_true_positions_differ_only_on_non_square_images(variant, name):
    """index_mode='rowcol' (flexgen's default for new training) equals NiT on square images
    and differs on the others by what the fixture measured with true axial positions."""
    model, _ = generator(variant, index_mode='rowcol')
    batch, t, y = inputs(variant, name)
    with torch.no_grad():
        out = model.network(batch, t, y)
    case = next(c for c in fixture(variant)[0]['cases'] if c['name'] == name)
    reference = batch.split(fixture(variant)[1][f'{name}.out'].flatten(1))
    for i, (ours, theirs) in enumerate(zip(batch.split(out), reference)):
        measured = case['rope_quirk_check']['per_image_maxabs'][i]
        h, w = batch.sizes[i].tolist()
        if h == w:
            assert measured == 0.0 and max_error(ours, theirs) <= TOLERANCE
        else:
            assert measured > 0.05 and abs(max_error(ours, theirs) - measured) <= 1e-4


@pytest.mark.parametrize('variant,name', all_cases())
def test_each_image_alone_equals_its_part_of_the_pack(variant, name):
    model, _ = generator(variant)
    batch, t, y = inputs(variant, name)
    with torch.no_grad():
        packed = batch.split(model.network(batch, t, y))
        for i, tokens in enumerate(batch.split(batch.tokens)):
            alone = model.network(TokenBatch(tokens, batch.sizes[i:i + 1]), t[i:i + 1],
                                  y[i:i + 1])
            assert max_error(alone, packed[i]) <= 2e-6


def test_classifier_free_guidance_matches_the_official_samplers():
    """case2: one latent, conditional and null label in one pack, combined as
    ``u + s (c - u)`` on all 32 channels: flexgen's guidance on the single image."""
    model, _ = generator('base')
    _, cases, _ = fixture('base')
    batch, t, y = inputs('base', 'case2')
    assert torch.equal(cases['case2.latent_0'], cases['case2.latent_1'])
    assert y[1] == NULL_LABEL and t[0] == t[1]
    single = patchify([cases['case2.latent_0']], 1)
    guidance = ClassifierFreeGuidance(scale=float(cases['case2.cfg_scale']))
    model_fn = guidance.wrap(model.network, single, y[:1], NULL_LABEL, guided_width=32,
                             patch_area=1)
    with torch.no_grad():
        guided = model_fn(single.tokens, float(t[0]))
    assert max_error(guided, cases['case2.cfg_out'].flatten(1)) <= TOLERANCE
    assert max_error(unpatchify(guided, single.sizes, 1)[0], cases['case2.cfg_out_0']) <= TOLERANCE


# --------------------------------------------------------------------------- recognition
def test_only_the_nit_converter_recognises_nit_weights():
    _, _, state_dict = fixture('base')
    names = [type(c).__name__ for c in matching_converters(state_dict)]
    assert names == ['NiTConverter']
    assert NiTConverter().matches(fixture('adaln_lora')[2])
    for family in ('dit', 'sit'):
        path = osp.join(FIXTURES, family, 'model.safetensors')
        if osp.exists(path):
            assert not NiTConverter().matches(load_file(path))
    assert build_converter('nit').__class__ is CHECKPOINT_CONVERTERS.get('NiT')
    # A flexgen state dict (2-D patch weight) is not a reference NiT.
    converted = NiTConverter()(state_dict)
    assert not NiTConverter().matches(converted.state_dict)


def test_bad_checkpoints_are_refused_with_the_reason():
    _, _, state_dict = fixture('base')
    broken = dict(state_dict)
    del broken['blocks.1.attn.k_norm.bias']
    with pytest.raises(KeyError, match='blocks.1.attn.k_norm.bias'):
        NiTConverter()(broken)
    extra = dict(state_dict, **{'blocks.0.attn.extra': torch.zeros(1)})
    with pytest.raises(KeyError, match='blocks.0.attn.extra'):
        NiTConverter()(extra)
    flat = dict(state_dict, **{'x_embedder.proj.weight':
                               state_dict['x_embedder.proj.weight'][:, :, 0, 0]})
    with pytest.raises(ValueError, match='Conv2d weight'):
        NiTConverter()(flat)
    with pytest.raises(KeyError, match='q_norm'):
        NiTConverter()({k: v for k, v in state_dict.items() if 'q_norm' not in k})
    with pytest.raises(ValueError, match='index_mode'):
        NiTConverter(index_mode='xy')
    # Without the (optional) projector the backbone still converts.
    bare = {k: v for k, v in state_dict.items() if not k.startswith('projector.')}
    converted = NiTConverter()(bare)
    assert converted.repa_state_dict == {} and converted.info['has_projector'] is False
    assert set(converted.state_dict) == set(NiTConverter()(state_dict).state_dict)


# --------------------------------------------------------------------------- configs + tools
def official_config(path='nit_xl_official.py'):
    """A NiT config at the fixture's size, without the DC-AE download."""
    info = fixture('base')[0]['constructor']['kwargs']
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'nit', path))
    cfg.merge_from_dict({
        'model.backbone.hidden_size': info['hidden_size'], 'model.backbone.depth': info['depth'],
        'model.backbone.num_heads': info['num_heads'],
        'model.autoencoder': dict(_delete_=True, type='IdentityAutoencoder', channels=32)})
    return cfg


def test_load_official_with_the_official_config_reproduces_the_fixture():
    path = osp.join(FIXTURES, 'nit', 'model.safetensors')
    model = load_official(official_config(), path)
    assert model.repa is None
    batch, t, y = inputs('base', 'case0')
    with torch.no_grad():
        out = model.network(batch, t, y)
    assert max_error(out, fixture('base')[1]['case0.out'].flatten(1)) <= TOLERANCE
    # Generation runs with the configured SDE and guidance (a few steps, mixed sizes).
    images = model.generate([3, 7], [(4, 6), (5, 5)], seeds=[0, 1],
                            sampler=dict(type='EulerMaruyamaSDE', num_steps=3))
    assert [tuple(i.shape) for i in images] == [(32, 4, 6), (32, 5, 5)]
    assert all(torch.isfinite(i).all() for i in images)


def test_the_training_config_needs_the_legacy_index_mode_for_official_weights():
    cfg = official_config('nit_xl_pack_16384.py')
    converted = NiTConverter()(fixture('base')[2])
    problems = backbone_mismatches(dict(cfg.model.backbone), converted.backbone)
    assert len(problems) == 1 and 'rope' in problems[0] and 'nit_legacy' in problems[0]


def test_convert_checkpoint_tool(tmp_path):
    src = osp.join(FIXTURES, 'nit', 'model_adaln_lora.safetensors')
    dst = tmp_path / 'nit.safetensors'
    proc = subprocess.run([sys.executable, 'tools/convert_checkpoint.py', '--from', 'nit',
                           src, str(dst)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = load_file(str(dst))
    converted = NiTConverter()(fixture('adaln_lora')[2])
    assert set(written) == {f'backbone.{k}' for k in converted.state_dict}
    for key, value in converted.state_dict.items():
        assert torch.equal(written[f'backbone.{key}'], value)
