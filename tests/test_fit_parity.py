"""FiT / FiTv2 official weights in FlexDiT reproduce the reference network.

Golden fixtures (tests/fixtures/fitv{1,2}, meta.json tells everything): a tiny reference
``FiT`` (github.com/whlzy/FiT at b22b7b0, run on CPU in float32) with random weights, and
its outputs for mixed square / non-square padded batches, garbage padding, classifier-free
guidance and every RoPE extrapolation rule (offline at the target size, and online per
image). Here the same weights go through the FiTv1 / FiTv2 converters into a FlexDiT fed
flexgen's jagged batches and flexgen's time; every output must match within 1e-5.
"""
import functools
import json
import math
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from safetensors.torch import load_file

# The configs' samplers register on import (until flexgen.samplers imports them itself).
import flexgen.samplers.ddpm  # noqa: F401  (DDPMAncestral: the FiTv1 config)
import flexgen.samplers.ode  # noqa: F401  (AdaptiveODE: the FiTv2 config)
from flexgen.models import FlexDiT
from flexgen.models.converters import fit  # noqa: F401  (registers FiTv1 / FiTv2)
from flexgen.registry import CHECKPOINT_CONVERTERS
from flexgen.samplers.guidance import ClassifierFreeGuidance
from flexgen.structures import patchify, unpatchify

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / 'tests' / 'fixtures'
TOLERANCE = 1e-5
NULL_LABEL = 1000

# The reference's custom_freqs names -> flexgen's RoPE extrapolation rules.
RULES = {'linear': 'PositionInterpolation', 'ntk-aware': 'NTKAware',
         'ntk-aware-pro1': 'NTKPro1', 'ntk-aware-pro2': 'NTKPro2',
         'ntk-by-parts': 'NTKByParts', 'yarn': 'YaRN'}


@functools.lru_cache(maxsize=None)
def fixture(family):
    folder = FIXTURES / family
    meta = json.loads((folder / 'meta.json').read_text())
    return meta, load_file(folder / 'cases.safetensors'), load_file(folder / 'model.safetensors')


def case_names(family):
    return [case['name'] for case in fixture(family)[0]['cases']]


def case_meta(family, name):
    return next(c for c in fixture(family)[0]['cases'] if c['name'] == name)


def rope_settings(rope):
    """flexgen's ``AxialRoPE2D`` settings for a fixture case's reference RoPE: offline
    tables built for ``max_pe_len``, or online (per image, also in training: FiTv2's
    HR fine-tuning)."""
    if rope['custom_freqs'] == 'normal':
        return {}
    rule = dict(type=RULES[rope['custom_freqs']], ori_max_pe_len=rope['ori_max_pe_len'],
                decouple=rope['decouple'])
    if rope['online_rope']:
        return dict(rule=rule, scale_in_training=True)
    return dict(rule=rule, max_pe_len=(rope['max_pe_len_h'], rope['max_pe_len_w']))


def build(family, rope=None, **options):
    """The fixture's reference weights converted into a FlexDiT (eval mode)."""
    _, _, state_dict = fixture(family)
    converter = CHECKPOINT_CONVERTERS.build(
        dict(type={'fitv1': 'FiTv1', 'fitv2': 'FiTv2'}[family], num_heads=2, rope=rope,
             **options))
    converted = converter(state_dict)
    model = FlexDiT(**converted.backbone)
    model.load_state_dict(converted.state_dict, strict=True)
    return model.eval(), converted.backbone


def flexgen_time(family, t):
    """Reference time -> flexgen's t: FiTv1 DDPM step k -> k / 1000; FiTv2 flow time
    s (0 noise) -> 1 - s (float64 keeps the round trip exact)."""
    t = t.double()
    return t / 1000 if family == 'fitv1' else 1 - t


def padded_rows(family, tensor):
    """The reference's padded ``[B, ., N]`` / ``[B, N, .]`` tensor as ``[B, N, C]``."""
    return tensor.transpose(1, 2) if family == 'fitv1' else tensor


def inputs(family, name):
    """(batch, flexgen t, labels) of a case; checks that flexgen's patchify of the image
    latents gives exactly the reference's valid tokens."""
    meta = case_meta(family, name)
    cases = fixture(family)[1]
    latents = [cases[f'{name}.latent_{i}'] for i in range(meta['batch'])]
    batch = patchify(latents, 2)
    x = padded_rows(family, cases[f'{name}.x'])
    valid = cases[f'{name}.mask'].bool()
    assert torch.equal(batch.tokens, x[valid])
    assert batch.sizes.tolist() == meta['sizes_hw_tokens']
    return batch, flexgen_time(family, cases[f'{name}.t']), cases[f'{name}.y']


def assert_matches(family, name, batch, output, key='out', first=0):
    """``output`` (flexgen tokens of images ``first, first + 1, ...``, in the reference's
    sign) against the padded reference tensor ``key`` (valid rows; its padded rows are
    zero) and against the image-space ``key_i`` tensors through flexgen's unpatchify."""
    cases = fixture(family)[1]
    rows = slice(first, first + batch.num_images)
    reference = padded_rows(family, cases[f'{name}.{key}'])[rows]
    valid = cases[f'{name}.mask'][rows].bool()
    assert torch.equal(reference[~valid], torch.zeros_like(reference[~valid]))
    error = (output - reference[valid]).abs().max().item()
    assert error <= TOLERANCE, f'{family} {name}: max abs error {error:.3g}'
    for i, image in enumerate(unpatchify(output, batch.sizes, 2), start=first):
        error = (image - cases[f'{name}.{key}_{i}']).abs().max().item()
        assert error <= TOLERANCE, f'{family} {name} image {i}: max abs error {error:.3g}'


def reference_sign(backbone):
    """FiTv2's velocity is negated into flexgen's dx/dt; undo it to compare."""
    return 1.0 / backbone['output_scale']


def guidance_scale(meta, t_reference):
    """The reference's guidance weight: constant, or MDT's power-cos schedule
    ``(w - 1) (1 - cos(pi (1 - t)^p)) / 2 + 1`` on the reference time."""
    scale, power = meta['cfg_scale'], meta['scale_pow']
    if power == 0:
        return scale
    return (scale - 1) * (1 - math.cos(math.pi * (1 - min(t_reference, 1.0)) ** power)) / 2 + 1


@pytest.mark.parametrize('family,name', [(f, n) for f in ('fitv1', 'fitv2')
                                         for n in case_names(f)])
def test_reference_case(family, name):
    """Every fixture case (FiTv1 with the converter's ``clamp_time`` quirk, as the
    reference forward runs). Online-RoPE cases run in training mode: the rule must act
    there too (FiTv2's HR fine-tuning trains with it)."""
    meta = case_meta(family, name)
    options = dict(clamp_time=True) if family == 'fitv1' else {}
    rope = rope_settings(meta['rope'])
    model, backbone = build(family, rope, **options)
    model.train(meta['rope']['online_rope'])
    batch, t, y = inputs(family, name)
    sign = reference_sign(backbone)
    with torch.no_grad():
        if meta['call'] == 'forward':
            assert_matches(family, name, batch, model(batch, t, y) * sign)
            if 'max_pe_len' in rope:
                # flexgen's default scales every image for its own size: the same numbers
                # on these one-size batches
                rope.pop('max_pe_len')
                per_image = build(family, rope, **options)[0]
                assert_matches(family, name, batch, per_image(batch, t, y) * sign)
            return
        # forward_with_cfg: the batch is [conditional half; unconditional half] of the
        # same inputs; the reference guides the first three latent channels (12 token
        # columns) and writes them to both halves; other columns stay unguided.
        half = batch.num_images // 2
        t_ref = fixture(family)[1][f'{name}.t']
        assert torch.equal(y[half:], torch.full_like(y[half:], NULL_LABEL))
        for i in range(half):  # one image at a time: each has its own time and weight
            one = patchify([fixture(family)[1][f'{name}.latent_{i}']], 2)
            guidance = ClassifierFreeGuidance(guidance_scale(meta, float(t_ref[i])),
                                              channels=(0, 1, 2))
            model_fn = guidance.wrap(model, one, y[i:i + 1], NULL_LABEL, 16, 4)
            guided = model_fn(one.tokens, float(t[i])) * sign
            assert_matches(family, name, one, guided, first=i)
            unconditional = model(one, t[i:i + 1], torch.tensor([NULL_LABEL])) * sign
            unconditional[:, :12] = guided[:, :12]
            assert_matches(family, name, one, unconditional, first=half + i)


@pytest.mark.parametrize('name', ['case0', 'case1'])
def test_fitv1_raw_ddpm_steps(name):
    """Without the quirk, FiTv1 embeds the DDPM step itself (the reference with its
    ``min(t, 1)`` disabled: the fixture's auxiliary ``out_rawt``)."""
    model, _ = build('fitv1')
    batch, t, y = inputs('fitv1', name)
    with torch.no_grad():
        assert_matches('fitv1', name, batch, model(batch, t, y), key='out_rawt')


def test_fitv1_time_clamp_is_an_explicit_quirk():
    """Steps 1, 250, 999 of identical inputs: alike with ``clamp_time``, distinct without."""
    batch, t, y = inputs('fitv1', 'case1')
    assert t.tolist() == [0.0, 0.001, 0.25, 0.999]
    with torch.no_grad():
        clamped = build('fitv1', clamp_time=True)[0](batch, t, y).view(4, -1, 32)
        raw = build('fitv1')[0](batch, t, y).view(4, -1, 32)
    assert torch.equal(clamped[1], clamped[2]) and torch.equal(clamped[1], clamped[3])
    assert (raw[1] - raw[3]).abs().max() > 0.1


@pytest.mark.parametrize('backend', ['sdpa', 'padded', 'per_image'])
@pytest.mark.parametrize('family', ['fitv1', 'fitv2'])
def test_every_attention_backend_reproduces_the_mixed_batch(family, backend):
    options = dict(clamp_time=True) if family == 'fitv1' else {}
    model, backbone = build(family, attn_backend=backend, **options)
    batch, t, y = inputs(family, 'case0')
    with torch.no_grad():
        assert_matches(family, 'case0', batch, model(batch, t, y) * reference_sign(backbone))


def test_converter_settings():
    _, v1 = build('fitv1')
    _, v2 = build('fitv2')
    assert (v1['time_scale'], v1['time_flip'], v1['output_scale']) == (1000.0, False, 1.0)
    assert v1['learn_sigma'] and v1['mlp'] == dict(type='SwiGLUMlp', large=True)
    assert 'time_max' not in v1 and 'global_modulation' not in v1
    assert (v2['time_scale'], v2['time_flip'], v2['output_scale']) == (1.0, True, -1.0)
    assert not v2['learn_sigma'] and v2['qk_norm'] == 'layernorm'
    assert v2['modulation'] == dict(type='AdaLNLoRA', rank=16)
    assert v2['mlp'] == dict(type='SwiGLUMlp')


def test_converters_refuse_the_other_version_and_name_what_is_wrong():
    _, _, v1 = fixture('fitv1')
    _, _, v2 = fixture('fitv2')
    v1_converter = CHECKPOINT_CONVERTERS.build(dict(type='FiTv1', num_heads=2))
    v2_converter = CHECKPOINT_CONVERTERS.build(dict(type='FiTv2', num_heads=2))
    assert v1_converter.matches(v1) and not v1_converter.matches(v2)
    assert v2_converter.matches(v2) and not v2_converter.matches(v1)
    with pytest.raises(KeyError, match='FiTv2 checkpoint'):
        v1_converter(v2)
    with pytest.raises(KeyError, match='fitv1'):
        v2_converter(v1)
    broken = {k: v for k, v in v1.items() if k != 'blocks.1.mlp.fc2.bias'}
    with pytest.raises(KeyError, match=r"missing keys \['blocks.1.mlp.fc2.bias'\]"):
        v1_converter(broken)
    # a width of no released model: the head count is left to the config
    assert 'num_heads' not in CHECKPOINT_CONVERTERS.build(dict(type='FiTv1'))(v1).backbone
    # DDP prefixes and training-checkpoint wrappers are unwrapped
    wrapped = {'ema': {f'module.{k}': v for k, v in v1.items()}}
    assert set(v1_converter(wrapped).state_dict) == set(v1)


def _tiny_config(path, **backbone):
    """A configs/fit config at the fixture's tiny size."""
    cfg = Config.fromfile(str(ROOT / 'configs' / 'fit' / path))
    cfg.model.backbone.update(hidden_size=64, depth=2, num_heads=2, **backbone)
    cfg.model.autoencoder = dict(type='IdentityAutoencoder', channels=4)  # no VAE download
    if cfg.model.backbone.modulation.type == 'AdaLNLoRA':
        cfg.model.backbone.modulation.rank = 16
    return cfg


@pytest.mark.parametrize('family,config,key', [('fitv1', 'fit_xl_2.py', 'out_rawt'),
                                               ('fitv2', 'fitv2_xl_2.py', 'out')])
def test_official_weights_through_the_configs(family, config, key):
    """flexgen.apis.official.load_official: the configs/fit recipe + reference weights
    (converter found from the checkpoint) reproduce the reference; FiTv1 with the real
    DDPM step (``out_rawt``) as configs/fit trains and samples."""
    from flexgen.apis.official import load_official
    model = load_official(_tiny_config(config), fixture(family)[2])
    batch, t, y = inputs(family, 'case0')
    with torch.no_grad():
        output = model.backbone(batch, t, y) / model.backbone.output_scale
    assert_matches(family, 'case0', batch, output, key=key)


def test_parity_quirk_needs_the_config_to_say_so():
    """clamp_time sets time_max=1; a config without it is refused, one with it matches."""
    from flexgen.apis.official import load_official
    converter = dict(type='FiTv1', clamp_time=True)
    with pytest.raises(ValueError, match='time_max is None, the checkpoint needs 1.0'):
        load_official(_tiny_config('fit_xl_2.py'), fixture('fitv1')[2], converter=converter)
    model = load_official(_tiny_config('fit_xl_2.py', time_max=1.0), fixture('fitv1')[2],
                          converter=converter)
    batch, t, y = inputs('fitv1', 'case1')
    with torch.no_grad():
        assert_matches('fitv1', 'case1', batch, model.backbone(batch, t, y))


@pytest.mark.parametrize('family', ['fitv1', 'fitv2'])
def test_convert_checkpoint_tool(family, tmp_path):
    """tools/convert_checkpoint.py --from fitv1|fitv2: generator keys and the settings."""
    import json

    from safetensors import safe_open
    from tools.convert_checkpoint import main
    main(['--from', family, '--num-heads', '2', str(FIXTURES / family / 'model.safetensors'),
          str(tmp_path / 'out.safetensors')])
    with safe_open(str(tmp_path / 'out.safetensors'), 'pt') as f:
        keys, metadata = set(f.keys()), f.metadata()
        reference = fixture(family)[2]
        assert keys == {f'backbone.{k}' for k in reference}
        assert all(torch.equal(f.get_tensor(f'backbone.{k}'), v) for k, v in reference.items())
    backbone = json.loads(metadata['backbone'])
    assert backbone == build(family)[1]
