"""Every example of docs/extending.md, run as written there: its file is saved (or, for a
file of the repository, must equal it), its config lines are appended to a child of the
demo config, the config trains through the Runner, and a check asserts what the part must
do (against a closed form, an independent computation or flexgen's own parts)."""
import math
import os.path as osp
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import flexgen
from flexgen.registry import MODELS
from flexgen.rng import KeyedDraws, mix
from flexgen.structures import patchify
from helpers import ROOT, load_tool

DOC = osp.join(ROOT, 'docs', 'extending.md')
BASE = osp.join(ROOT, 'tests', 'configs', 'tiny_shapes_ema.py')
SIZES = [(16, 24), (32, 16)]  # pixels, multiples of the demo's patch 4


def sections():
    """``{module name: (module source, repository path or None, config lines)}`` of the
    doc's sections, from its ```python blocks (``# <file>.py`` and ``# config``)."""
    found = {}
    for text in re.split(r'\n## ', open(DOC).read())[1:]:
        title = text.splitlines()[0]
        blocks = re.findall(r'```python\n(.*?)```', text, re.S)
        modules = [b for b in blocks if re.match(r'# \S+\.py\n', b)]
        configs = [b for b in blocks if b.startswith('# config\n')]
        assert len(modules) == 1 and len(configs) == 1, f'section {title!r}: one file, one config'
        path, source = modules[0].split('\n', 1)
        path = path[2:]
        name = osp.splitext(osp.basename(path))[0]
        found[name] = (source, path if '/' in path else None, configs[0].split('\n', 1)[1])
    return found


SECTIONS = sections()


def install(name, tmp_path, monkeypatch):
    """Put the section's file where ``custom_imports`` finds it; a repository file must be
    the doc's text exactly."""
    source, repo_path, _ = SECTIONS[name]
    if repo_path is not None:
        assert open(osp.join(ROOT, repo_path)).read() == source, \
            f'docs/extending.md shows {repo_path} out of date'
        directory = osp.dirname(osp.join(ROOT, repo_path))
    else:
        directory = tmp_path / 'parts'
        directory.mkdir(exist_ok=True)
        (directory / f'{name}.py').write_text(source)
    monkeypatch.syspath_prepend(str(directory))


def write_config(name, tmp_path):
    path = tmp_path / f'{name}_config.py'
    path.write_text(f'_base_ = [{BASE!r}]\n' + SECTIONS[name][2])
    return str(path)


def train(name, tmp_path, monkeypatch):
    """The section's config trained 4 steps through tools/train.py: the runner, the model."""
    install(name, tmp_path, monkeypatch)
    torch.set_num_threads(1)
    runner = load_tool('train').main([write_config(name, tmp_path), '--work-dir',
                                      str(tmp_path / 'work')])
    losses = runner.message_hub.get_scalar('train/loss').data[0]
    assert len(losses) == 4 and np.isfinite(losses).all()
    return runner, runner.model.eval()


def generate_ok(model, labels=(1, 4), sizes=SIZES):
    images = model.generate(list(labels), sizes, list(range(len(labels))))
    assert [tuple(x.shape[-2:]) for x in images] == [tuple(s) for s in sizes]
    assert all(torch.isfinite(x).all() for x in images)
    return images


def token_batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, h, w, generator=g) for h, w in SIZES]
    return patchify(images, model.patch_size)


def backbone_output(model, batch, t=(0.3, 0.8), y=(1, 4)):
    with torch.no_grad():
        return model.backbone(batch, torch.tensor(t, dtype=torch.float64), torch.tensor(y))


# ------------------------------------------------------------------------------ checks
def check_parallel_block(tmp_path, monkeypatch):
    runner, model = train('parallel_block', tmp_path, monkeypatch)
    from parallel_block import ParallelAdaLNBlock
    blocks = model.backbone.blocks
    assert all(isinstance(b, ParallelAdaLNBlock) for b in blocks)
    # trained: the zero-initialised modulation has moved
    assert all(b.adaLN_modulation[-1].weight.abs().max() > 0 for b in blocks)
    # it initialises itself: a fresh block is the identity (adaLN-Zero)
    fresh = MODELS.build(runner.cfg.model)
    fresh.init_weights()
    block, batch = fresh.backbone.blocks[0], token_batch(fresh)
    x = torch.randn(batch.tokens.shape[0], fresh.backbone.hidden_size)
    c = torch.randn(batch.num_images, fresh.backbone.hidden_size)
    assert torch.equal(block(x, c, batch, None), x)
    generate_ok(model)


def check_relu_squared_mlp(tmp_path, monkeypatch):
    _, model = train('relu_squared_mlp', tmp_path, monkeypatch)
    from relu_squared_mlp import ReLUSquaredMlp
    mlp = model.backbone.blocks[0].mlp
    assert isinstance(mlp, ReLUSquaredMlp) and mlp.fc1.out_features == 4 * mlp.fc1.in_features
    x = torch.randn(5, mlp.fc1.in_features, dtype=torch.float64)
    mlp = mlp.double()
    with torch.no_grad():
        pre = x @ mlp.fc1.weight.T + mlp.fc1.bias
        expected = torch.where(pre > 0, pre * pre, 0) @ mlp.fc2.weight.T + mlp.fc2.bias
        torch.testing.assert_close(mlp(x), expected)
    generate_ok(model.float())


def check_loop_attention(tmp_path, monkeypatch):
    runner, model = train('loop_attention', tmp_path, monkeypatch)
    from loop_attention import LoopAttention
    assert all(isinstance(b.attn.backend, LoopAttention) for b in model.backbone.blocks)
    cfg = runner.cfg.model.copy()
    cfg.backbone.attn_backend = 'per_image'  # flexgen's reference loop
    reference = MODELS.build(cfg)
    reference.load_state_dict(model.state_dict())
    batch = token_batch(model)
    torch.testing.assert_close(backbone_output(model, batch),
                               backbone_output(reference.eval(), batch), rtol=1e-5, atol=1e-6)
    generate_ok(model)


def check_sqrt_interpolation(tmp_path, monkeypatch):
    runner, model = train('sqrt_interpolation', tmp_path, monkeypatch)
    from flexgen.position_encodings.rope_scaling import base_frequencies
    from sqrt_interpolation import SqrtInterpolation
    rope = model.backbone.rope
    assert isinstance(rope.rule, SqrtInterpolation)
    d = rope.axis_dim
    plain = base_frequencies(d, rope.theta)
    rows, cols, factor = rope.rule.tables(8, 8, d, rope.theta)
    assert torch.equal(rows, plain) and torch.equal(cols, plain) and factor == 1.0
    rows, cols, _ = rope.rule.tables(16, 12, d, rope.theta)  # s = 16 / 8 on both axes
    torch.testing.assert_close(rows, plain / math.sqrt(2), rtol=1e-15, atol=0)
    # sampling past the training grid uses it; inside the grid it is plain RoPE
    cfg = runner.cfg.model.copy()
    cfg.backbone.rope.rule = None
    plain_model = MODELS.build(cfg).eval()
    plain_model.load_state_dict(model.state_dict())
    assert torch.equal(generate_ok(model, (2,), [(32, 32)])[0],
                       generate_ok(plain_model, (2,), [(32, 32)])[0])
    assert not torch.equal(generate_ok(model, (2,), [(48, 64)])[0],
                           generate_ok(plain_model, (2,), [(48, 64)])[0])
    # tools/sample.py --interpolation takes the new name (the config imports it)
    grids = {}
    for rule in ('SqrtInterpolation', 'no'):
        out = str(tmp_path / f'{rule}.png')
        monkeypatch.setattr(sys, 'argv', [
            'sample.py', write_config('sqrt_interpolation', tmp_path),
            osp.join(runner.work_dir, 'iter_4.pth'), '--classes', '2', '--height', '48',
            '--width', '64', '--interpolation', rule, '--ori-max-pe-len', '8', '--out', out])
        load_tool('sample').main()
        grids[rule] = np.asarray(Image.open(out))
    assert not np.array_equal(grids['SqrtInterpolation'], grids['no'])


def check_x_prediction_flow(tmp_path, monkeypatch):
    _, model = train('x_prediction_flow', tmp_path, monkeypatch)
    from x_prediction_flow import XPredictionFlow
    transport = model.transport
    assert isinstance(transport, XPredictionFlow)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    t = torch.rand(6, 1, generator=g) * 0.9 + 0.1
    x_t = transport.interpolate(x0, noise, t)
    # the exact clean image gives the exact velocity of the straight path, zero loss and
    # zero direction loss (which compares the output with the training target)
    torch.testing.assert_close(transport.velocity(x0, x_t, t), noise - x0)
    torch.testing.assert_close(transport.loss(x0, x0, noise, t), torch.zeros(6))
    direction = model.direction_loss(x0, transport.training_target(x0, noise, t))
    torch.testing.assert_close(direction, torch.zeros_like(direction), rtol=0, atol=1e-6)
    assert torch.equal(transport.velocity(x0, x_t, 0.01), (x_t - x0) / 0.05)  # clipped
    generate_ok(model)


def check_mode_time(tmp_path, monkeypatch):
    _, model = train('mode_time', tmp_path, monkeypatch)
    from mode_time import ModeTime
    from flexgen.transports import UniformTime
    assert isinstance(model.time_sampler, ModeTime)
    draws = KeyedDraws(mix(7, 0, torch.arange(100_000)))
    torch.testing.assert_close(ModeTime(scale=0.0)(draws), 1 - UniformTime()(draws))
    t = model.time_sampler(draws).double()
    assert 0 <= t.min() and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.005  # E[cos^2(pi u / 2) - 1 + u] = 0
    middle = ((t > 1 / 3) & (t < 2 / 3)).double().mean().item()
    assert middle > 1 / 3 + 0.05  # more mass at intermediate times than uniform
    # keyed: an image's t does not depend on the rest of the batch
    part = model.time_sampler(KeyedDraws(mix(7, 0, torch.arange(5, 8))))
    assert torch.equal(part, t[5:8].float())
    with pytest.raises(ValueError, match='ModeTime: scale'):
        ModeTime(scale=2.0)


def check_midpoint_ode(tmp_path, monkeypatch):
    _, model = train('midpoint_ode', tmp_path, monkeypatch)
    from midpoint_ode import MidpointODE
    from flexgen.transports import RectifiedFlow
    assert isinstance(model.sampler, MidpointODE)
    # dx/dt = x from t = 1 to t = 0: x(0) = x(1) / e; second order: error / 4 per halving
    x1 = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None]
    errors = [(MidpointODE(n)(lambda x, t: x, RectifiedFlow(), x1) - x1 / math.e).abs().max()
              for n in (8, 16, 32)]
    assert 3.6 < errors[0] / errors[1] < 4.4 and 3.8 < errors[1] / errors[2] < 4.2
    calls = []
    MidpointODE(5)(lambda x, t: calls.append(t) or x, RectifiedFlow(), x1)
    assert len(calls) == 10
    generate_ok(model)


def check_ramped_cfg(tmp_path, monkeypatch):
    _, model = train('ramped_cfg', tmp_path, monkeypatch)
    from ramped_cfg import RampedCFG
    from flexgen.samplers import ClassifierFreeGuidance
    assert isinstance(model.guidance, RampedCFG) and model.guidance.scale == 4.0
    batch = token_batch(model)
    labels = torch.tensor([1, 4])
    args = (model.network, batch, labels, model.num_classes, batch.tokens.shape[1],
            model.patch_size ** 2)
    ramped = model.guidance.wrap(*args)
    x = batch.tokens
    with torch.no_grad():
        for t, scale in ((0.0, 4.0), (0.5, 2.5), (1.0, 1.0)):
            expected = ClassifierFreeGuidance(scale=scale).wrap(*args)(x, t)
            torch.testing.assert_close(ramped(x, t), expected, rtol=1e-5, atol=1e-6)
    generate_ok(model)


def check_checkerboards(tmp_path, monkeypatch):
    runner, model = train('checkerboards', tmp_path, monkeypatch)
    from checkerboards import Checkerboards
    dataset = runner.train_dataloader.dataset
    assert isinstance(dataset, Checkerboards) and len(dataset) == 64
    for i in range(len(dataset)):
        item = dataset[i]
        assert tuple(item['inputs'].shape) == (3, *dataset.get_size(i))
        assert item['data_samples'] == dict(label=dataset.get_label(i), index=i)
        assert torch.equal(item['inputs'], dataset[i]['inputs'])  # keyed, not global RNG
    side_2 = dataset[0]['inputs'][0]
    assert dataset.get_label(0) == 0 and set(side_2.unique().tolist()) == \
        {-side_2.max().item(), side_2.max().item()}
    with pytest.raises(IndexError, match='Checkerboards: index 64'):
        dataset.get_size(64)
    meta = torch.load(osp.join(runner.work_dir, 'iter_4.pth'), map_location='cpu',
                      weights_only=False)['meta']
    assert meta['dataset_meta'] == dict(classes=('side 2', 'side 4'))
    generate_ok(model, (0, 1))


def check_mixed_size_batches(tmp_path, monkeypatch):
    runner, model = train('mixed_size_batches', tmp_path, monkeypatch)
    from mixed_size_batches import MixedSizeBatchSampler
    sampler = runner.train_dataloader.batch_sampler
    assert isinstance(sampler, MixedSizeBatchSampler) and sampler.batch_size == 4
    dataset = sampler.dataset
    steps_per_epoch = len(dataset) // 4
    assert len(sampler) == steps_per_epoch
    sampler.set_start_iter(0)
    walk = iter(sampler)
    steps = [next(walk) for _ in range(2 * steps_per_epoch + 3)]
    epoch0 = [i for step in steps[:steps_per_epoch] for i in step]
    assert sorted(epoch0) == list(range(len(dataset)))  # an epoch sees each image once
    assert steps[steps_per_epoch:2 * steps_per_epoch] != steps[:steps_per_epoch]
    assert any(len({dataset.get_size(i) for i in step}) > 1 for step in steps)  # mixed sizes
    for start in (5, steps_per_epoch + 1):  # resume, also past an epoch's end
        sampler.set_start_iter(start)
        assert next(iter(sampler)) == steps[start]
    # two ranks split each global step of batch_size per rank
    sampler.set_start_iter(0)
    sampler.world_size = 2
    parts = []
    for rank in (0, 1):
        sampler.rank = rank
        parts.append(next(iter(sampler)))
    assert len(parts[0]) == len(parts[1]) == 4 and not set(parts[0]) & set(parts[1])
    assert parts[0] + parts[1] == epoch0[:8]


def check_net_converter(tmp_path, monkeypatch):
    runner, model = train('net_converter', tmp_path, monkeypatch)
    from flexgen.apis import load_official
    their = {'net': {f'backbone.{k}': v for k, v in model.backbone.state_dict().items()}}
    path = str(tmp_path / 'their_checkpoint.pt')
    torch.save(their, path)
    config = write_config('net_converter', tmp_path)
    loaded = load_official(config, path)
    assert loaded.official_info == dict(source='NetTrainer')
    batch = token_batch(model)
    assert torch.equal(backbone_output(loaded, batch), backbone_output(model, batch))
    out = str(tmp_path / 'grid.png')
    monkeypatch.setattr(sys, 'argv', ['sample.py', config, path, '--classes', '1', '--height',
                                      '16', '--width', '16', '--device', 'cpu', '--out', out])
    load_tool('sample').main()
    image = model.generate([1], [(16, 16)], [0])[0]
    expected = (((image + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8)
    assert np.array_equal(np.asarray(Image.open(out))[2:18, 2:18],
                          expected.permute(1, 2, 0).numpy())


CHECKS = {name[len('check_'):]: fn for name, fn in globals().items()
          if name.startswith('check_')}


def test_every_section_has_a_check():
    assert sorted(SECTIONS) == sorted(CHECKS)


@pytest.mark.parametrize('name', sorted(SECTIONS))
def test_doc_example(name, tmp_path, monkeypatch):
    flexgen.register_all_modules()
    CHECKS[name](tmp_path, monkeypatch)
