"""Every shipped config assembles an mmengine Runner (train / val / test parts consistent),
with the backbone cut to one block and a pixel-space stand-in for the autoencoder (the real
ones load weights from disk or the Hub)."""
import contextlib
import glob
import io
import os.path as osp

import pytest
from mmengine.config import Config
from mmengine.runner import Runner

import flexgen

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '*', '*.py'))
                 if '_base_' not in p)


def test_every_family_ships_configs():
    families = {p.split(osp.sep)[1] for p in CONFIGS}
    assert {'demo', 'dit', 'sit', 'fit', 'nit'} <= families


@pytest.mark.parametrize('path', CONFIGS)
def test_config_builds_a_runner(path, tmp_path):
    flexgen.register_all_modules()
    cfg = Config.fromfile(osp.join(ROOT, path))
    cfg.work_dir = str(tmp_path)
    cfg.model.autoencoder = dict(type='IdentityAutoencoder',
                                 channels=cfg.model.backbone.in_channels)
    cfg.model.backbone.update(depth=1)
    cfg.model.pop('repa', None)
    with contextlib.redirect_stdout(io.StringIO()):
        runner = Runner.from_cfg(cfg)
    assert runner.model.backbone.in_channels == cfg.model.backbone.in_channels
    assert len(runner.model.backbone.blocks) == 1
