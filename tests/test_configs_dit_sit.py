"""configs/dit and configs/sit: the papers' sizes and recipes, boundary settings that
official checkpoints need, and every config's generator builds (tiny widths for speed)."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config

import flexgen
from flexgen.apis.official import backbone_mismatches, load_official
from flexgen.models.converters.dit_sit import DiTConverter, SiTConverter
from flexgen.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DIT = sorted(glob.glob(osp.join(ROOT, 'configs', 'dit', '*.py')))
SIT = sorted(glob.glob(osp.join(ROOT, 'configs', 'sit', '*.py')))
FIXTURES = osp.join(ROOT, 'tests', 'fixtures')

flexgen.register_all_modules()

# DiT Table 1: (depth, width, heads) per size name.
SIZES = dict(s=(12, 384, 6), b=(12, 768, 12), l=(24, 1024, 16), xl=(28, 1152, 16))
# Trainable parameters measured on the built reference at input size 32 (its pos_embed is
# a frozen parameter; flexgen computes that table and stores nothing): they check the
# closed form official_dit_parameters, which gives every size.
REFERENCE_TRAINABLE = {('s', 2): 32_865_056, ('b', 2): 130_315_808, ('l', 2): 457_840_672,
                       ('xl', 2): 674_834_720, ('xl', 4): 675_000_704, ('xl', 8): 675_664_640}
DIT_XL_2_WITH_POS_EMBED = 675_129_632  # fast-DiT's "DiT Parameters" line


def name_parts(path):
    parts = osp.basename(path)[:-3].split('_')  # dit_xl_2_256 / sit_xl_2[_sde]
    return parts[1], int(parts[2])


def test_the_twelve_dit_sizes_and_the_512_model_exist():
    names = {osp.basename(p) for p in DIT}
    expected = {f'dit_{s}_{p}_256.py' for s in SIZES for p in (2, 4, 8)} | {'dit_xl_2_512.py'}
    assert names == expected
    assert {osp.basename(p) for p in SIT} == {f'sit_{s}_2.py' for s in SIZES} | {
        'sit_xl_2_sde.py'}


@pytest.mark.parametrize('path', DIT + SIT, ids=osp.basename)
def test_sizes_recipe_and_boundary(path):
    cfg = Config.fromfile(path)
    size, patch = name_parts(path)
    backbone = cfg.model.backbone
    depth, width, heads = SIZES[size]
    assert (backbone.depth, backbone.hidden_size, backbone.num_heads, backbone.patch_size) == (
        depth, width, heads, patch)
    assert (backbone.in_channels, backbone.num_classes, backbone.learn_sigma) == (4, 1000, True)
    # The recipe: AdamW lr 1e-4, no weight decay, constant, EMA 0.9999, batch 32 x 8 GPUs.
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', 1e-4, 0.0)
    assert tuple(optimizer.betas) == (0.9, 0.999) and cfg.param_scheduler == []
    assert 'clip_grad' not in cfg.optim_wrapper
    ema = [h for h in cfg.custom_hooks if h.type == 'FlexEMAHook']
    assert len(ema) == 1 and ema[0].momentum == pytest.approx(1e-4)
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 256
    assert cfg.model.class_dropout_prob == 0.1
    resolution = 512 if path.endswith('_512.py') else 256
    assert cfg.train_dataloader.dataset.resolution == resolution
    assert [tuple(s) for s in cfg.test_dataloader.dataset.sizes] == [(resolution, resolution)]
    long_run = {'dit_xl_2_256.py': 7_000_000, 'dit_xl_2_512.py': 3_000_000,
                'sit_xl_2.py': 7_000_000, 'sit_xl_2_sde.py': 7_000_000}
    assert cfg.train_cfg.max_iters == long_run.get(osp.basename(path), 400_000)
    # The boundary an official checkpoint of this family needs (see the converters).
    converter = DiTConverter() if path in DIT else SiTConverter()
    for key, value in converter.boundary.items():
        assert backbone[key] == value, key
    guidance = cfg.model.guidance
    assert (guidance.scale, tuple(guidance.channels)) == (1.5, (0, 1, 2))


def test_dit_and_sit_training_and_sampling_settings():
    dit, sit = Config.fromfile(DIT[0]).model, Config.fromfile(SIT[0]).model
    assert dict(dit.transport) == dict(type='DDPM', beta_schedule='linear',
                                       num_timesteps=1000, prediction='eps',
                                       variance='learned_range', loss='hybrid')
    assert dict(dit.time_sampler) == dict(type='DiscreteUniformTime', num_timesteps=1000)
    assert dict(dit.sampler) == dict(type='DDPMAncestral', num_steps='250')
    assert (sit.transport.type, sit.transport.path, sit.transport.prediction) == (
        'Interpolant', 'linear', 'velocity')
    assert sit.time_sampler.type == 'UniformTime'
    assert dict(sit.sampler) == dict(type='AdaptiveODE', atol=1e-6, rtol=1e-3)
    sde = Config.fromfile(osp.join(ROOT, 'configs', 'sit', 'sit_xl_2_sde.py')).model.sampler
    assert dict(sde) == dict(type='EulerMaruyamaSDE', num_steps=250, diffusion_form='sigma',
                             diffusion_norm=1.0, last_step='Mean', last_step_size=0.04)
    for model in (dit, sit):
        assert model.autoencoder.scaling_factor == 0.18215


def official_dit_parameters(depth, width, patch, grid, in_channels=4, learn_sigma=True,
                            num_classes=1000, mlp_ratio=4.0, frequency_size=256):
    """Parameters of the reference DiT (its ``models.py``), frozen ``pos_embed`` included,
    counted from the architecture: patch conv, pos_embed [T, D], timestep MLP
    (256 -> D -> D), label table (classes + the null row), per block adaLN (D -> 6D), qkv,
    proj, MLP (D -> rD -> D), and the final adaLN (D -> 2D) and linear (D -> p^2 C_out)."""
    d, hidden, out = width, int(width * mlp_ratio), in_channels * (2 if learn_sigma else 1)

    def linear(n_in, n_out):
        return n_in * n_out + n_out

    block = (linear(d, 6 * d) + linear(d, 3 * d) + linear(d, d) + linear(d, hidden)
             + linear(hidden, d))
    return (linear(in_channels * patch * patch, d) + grid * grid * d
            + linear(frequency_size, d) + linear(d, d) + (num_classes + 1) * d
            + depth * block + linear(d, 2 * d) + linear(d, patch * patch * out))


@pytest.mark.parametrize('path', DIT + SIT, ids=osp.basename)
def test_full_size_parameter_count(path):
    """Built on the meta device (no memory, no time): the reference's count from its
    architecture minus its frozen T x D pos_embed, which flexgen computes instead of
    storing. The closed form itself reproduces the counts measured on the reference."""
    size, patch = name_parts(path)
    cfg = Config.fromfile(path)
    backbone = dict(cfg.model.backbone)
    with torch.device('meta'):
        model = MODELS.build(backbone)
    count = sum(p.numel() for p in model.parameters())
    grid = (512 if path.endswith('_512.py') else 256) // 8 // patch
    official = official_dit_parameters(backbone['depth'], backbone['hidden_size'], patch, grid,
                                       backbone['in_channels'], backbone['learn_sigma'],
                                       backbone['num_classes'], backbone['mlp_ratio'])
    pos_embed = grid * grid * backbone['hidden_size']
    assert count == official - pos_embed
    if (size, patch) in REFERENCE_TRAINABLE:  # trainable: the same at any resolution
        assert official - pos_embed == REFERENCE_TRAINABLE[size, patch]
    if (size, patch, grid) == ('xl', 2, 16):
        assert official == DIT_XL_2_WITH_POS_EMBED
    assert all(p.requires_grad for p in model.parameters())


def tiny(path):
    """The config with the fixtures' network width and no VAE (latents are the images)."""
    cfg = Config.fromfile(path)
    cfg.merge_from_dict({'model.backbone.hidden_size': 64, 'model.backbone.depth': 2,
                         'model.backbone.num_heads': 4,
                         'model.autoencoder': dict(_delete_=True, type='IdentityAutoencoder',
                                                   channels=4)})
    return cfg


@pytest.mark.parametrize('path', DIT + SIT, ids=osp.basename)
def test_every_config_builds_and_trains_a_step(path):
    model = MODELS.build(tiny(path).model)
    size, patch = name_parts(path)
    assert model.backbone.patch_size == patch
    latents = [torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    samples = dict(label=torch.tensor([3, 7]), seed=0, step=0, index=torch.tensor([0, 1]))
    loss = model(latents, samples, mode='loss')['loss']
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.backbone.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('family', ['dit', 'sit'])
def test_official_fixture_loads_into_the_real_config(family):
    """The fixture network (reference sizes aside) loads into the family's own config: the
    converter the config agrees with is chosen by itself, with no settings to adjust."""
    path = osp.join(ROOT, 'configs', family, f'{family}_xl_2_256.py' if family == 'dit'
                    else 'sit_xl_2.py')
    cfg = tiny(path)
    checkpoint = osp.join(FIXTURES, family, 'model.safetensors')
    model = load_official(cfg, checkpoint)
    converter = DiTConverter() if family == 'dit' else SiTConverter()
    from safetensors.torch import load_file
    converted = converter(load_file(checkpoint))
    assert backbone_mismatches(dict(cfg.model.backbone), converted.backbone) == []
    for name, value in converted.state_dict.items():
        assert torch.equal(model.backbone.state_dict()[name], value), name
    # The pieces sample together (few steps; guidance on channels 0-2 as configured).
    sampler = (dict(type='DDPMAncestral', num_steps='4') if family == 'dit' else
               dict(type='EulerMaruyamaSDE', num_steps=4))
    images = model.generate([3, 1000 - 1], [(8, 8), (8, 12)], seeds=[0, 1], sampler=sampler)
    assert [tuple(i.shape) for i in images] == [(4, 8, 8), (4, 8, 12)]
    assert all(torch.isfinite(i).all() for i in images)
