"""Which weights every reader of a training checkpoint loads, on checkpoints the Runner
writes: mmengine's EMAHook swaps the state dicts when it saves (``state_dict`` = EMA,
``ema_state_dict`` = raw), and every flexgen reader must take EMA by default."""
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

import flexgen
from flexgen.apis import init_generator, load_weights
from flexgen.samplers.guidance import AutoGuidance
from helpers import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'tests', 'configs', 'tiny_shapes_ema.py')


def train(work_dir, *options):
    torch.set_num_threads(1)
    return load_tool('train').main([CONFIG, '--work-dir', str(work_dir), *options])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 4-step run through the Runner: the checkpoint it wrote, and its EMA and raw
    weights as the Runner holds them at the end."""
    flexgen.register_all_modules()
    work_dir = tmp_path_factory.mktemp('ema')
    runner = train(work_dir)
    ema_hook = next(h for h in runner.hooks if type(h).__name__ == 'FlexEMAHook')
    ema = {k[len('module.'):]: v.clone() for k, v in ema_hook.ema_model.state_dict().items()
           if k.startswith('module.')}
    raw = {k: v.clone() for k, v in runner.model.state_dict().items()}
    assert max((ema[k] - raw[k]).abs().max() for k in raw) > 1e-3  # the test can tell them apart
    return work_dir, osp.join(work_dir, 'iter_4.pth'), ema, raw


def assert_same(state, expected):
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_load_weights_and_init_generator_read_ema_by_default(trained):
    _, checkpoint, ema, raw = trained
    assert_same(load_weights(checkpoint), ema)
    assert_same(load_weights(checkpoint, use_ema=False), raw)
    assert_same(init_generator(CONFIG, checkpoint).state_dict(), ema)
    assert_same(init_generator(CONFIG, checkpoint, use_ema=False).state_dict(), raw)


def test_sample_tool_samples_the_ema_model(trained, monkeypatch):
    work_dir, checkpoint, ema, raw = trained
    sample = load_tool('sample')
    pngs = {}
    for name, flags in (('ema', []), ('raw', ['--no-ema'])):
        out = osp.join(work_dir, f'{name}.png')
        monkeypatch.setattr(sys, 'argv', ['sample.py', CONFIG, checkpoint, '--classes', '1',
                                          '--height', '16', '--width', '16', '--device',
                                          'cpu', '--out', out, *flags])
        sample.main()
        pngs[name] = np.asarray(Image.open(out))
    for name, weights in (('ema', ema), ('raw', raw)):
        model = init_generator(CONFIG)
        model.load_state_dict(weights)
        image = model.generate([1], [(16, 16)], [0])[0]
        expected = (((image + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8)
        assert np.array_equal(pngs[name][2:18, 2:18], expected.permute(1, 2, 0).numpy()), name
    assert not np.array_equal(pngs['ema'], pngs['raw'])


def test_autoguidance_weak_model_reads_ema_by_default(trained):
    _, checkpoint, ema, raw = trained
    backbone_cfg = Config.fromfile(CONFIG).model.backbone.to_dict()
    for use_ema, expected in ((True, ema), (False, raw)):
        guidance = AutoGuidance(backbone_cfg, checkpoint=checkpoint, use_ema=use_ema)
        assert_same(guidance.weak_model.state_dict(),
                    {k[len('backbone.'):]: v for k, v in expected.items()
                     if k.startswith('backbone.')})


def test_resume_continues_bit_identically(trained, tmp_path):
    work_dir, checkpoint, _, _ = trained
    resumed = train(tmp_path, '--resume', osp.join(work_dir, 'iter_2.pth'))
    assert resumed.iter == 4
    whole = torch.load(checkpoint, weights_only=True)
    again = torch.load(tmp_path / 'iter_4.pth', weights_only=True)
    for key in ('state_dict', 'ema_state_dict'):
        assert_same(again[key], whole[key])
