"""tools/train.py and tools/test.py: config inheritance, CLI options, key checks, real runs
in subprocesses (one process, and 2-process torchrun DDP on CPU)."""
import inspect
import json
import os
import os.path as osp
import socket
import subprocess
import sys
import uuid

import pytest
import torch

import flexgen
from flexgen.engine import AutocastOptimWrapper, FlexCheckpointHook, FlexTrainLoop
from helpers import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY_CFG = osp.join('tests', 'configs', 'toy_train.py')
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [osp.join(ROOT, 'tests'), os.environ.get('PYTHONPATH', '')]))


train_tool = load_tool('train')
flexgen.register_all_modules()


def test_inheritance_and_cli_options_reach_the_runner(tmp_path):
    runner = train_tool.build_runner([
        osp.join(ROOT, TOY_CFG), '--work-dir', str(tmp_path), '--seed', '3', '--amp',
        '--cfg-options', 'train_cfg.max_iters=5', 'optim_wrapper.optimizer.lr=0.003',
        f'experiment_name=cli_{uuid.uuid4().hex[:6]}'])
    assert runner.work_dir == str(tmp_path) and runner.seed == 3
    assert isinstance(runner.train_loop, FlexTrainLoop) and runner.max_iters == 5
    wrapper = runner.build_optim_wrapper(runner.optim_wrapper)  # the Runner builds it lazily
    assert isinstance(wrapper, AutocastOptimWrapper) and wrapper.cast_dtype == torch.bfloat16
    assert wrapper.param_groups[0]['lr'] == 0.003
    # from configs/_base_/default_runtime.py, with the child's interval
    ckpt = next(h for h in runner.hooks if isinstance(h, FlexCheckpointHook))
    assert ckpt.interval == 4 and ckpt.by_epoch is False
    assert runner.cfg.default_scope == 'flexgen'
    assert runner.cfg.log_processor.by_epoch is False


def test_resume_flag():
    from flexgen.apis.runners import apply_train_options, load_config
    cfg = load_config(osp.join(ROOT, TOY_CFG))
    auto = apply_train_options(cfg.copy(), resume='auto')
    assert auto.resume is True and auto.load_from is None
    path = apply_train_options(cfg.copy(), resume='a/iter_4.pth')
    assert path.resume is True and path.load_from == 'a/iter_4.pth'
    assert cfg.copy().get('resume') is False  # without the flag: the config's value


def test_config_keys_come_from_the_runner_signature():
    from mmengine.runner import Runner

    from flexgen.apis.runners import config_keys
    assert {'train_dataloader', 'param_scheduler', 'randomness'} <= config_keys()
    assert 'cfg' not in config_keys() and 'self' not in config_keys()
    assert set(inspect.signature(Runner.__init__).parameters) - {'self', 'cfg'} <= config_keys()


def test_misspelled_top_level_key_names_the_valid_one():
    with pytest.raises(KeyError, match=r"toy_typo\.py.*'trian_cfg'.*Did you mean 'train_cfg'"):
        train_tool.build_runner([osp.join(ROOT, 'tests', 'configs', 'toy_typo.py')])


def read_losses(work_dir):
    (run,) = [d for d in os.listdir(work_dir) if osp.isdir(osp.join(work_dir, d))]
    with open(osp.join(work_dir, run, 'vis_data', 'scalars.json')) as f:
        return [json.loads(line)['loss'] for line in f if '"loss"' in line]


def train(work_dir, *options, nproc=1):
    launcher = [sys.executable, 'tools/train.py'] if nproc == 1 else [
        sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
        f'--master_port={free_port()}', 'tools/train.py']
    proc = subprocess.run(launcher + [TOY_CFG, '--work-dir', str(work_dir), *options],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_toy_config_trains_and_loss_falls(tmp_path):
    train(tmp_path, '--cfg-options', 'train_cfg.max_iters=60', 'log_processor.window_size=1',
          'default_hooks.checkpoint.interval=60')
    losses = read_losses(tmp_path)
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    # tools/test.py evaluates the checkpoint (loaded with weights_only=True).
    test_tool = load_tool('test')
    metrics = test_tool.main([
        osp.join(ROOT, TOY_CFG), str(tmp_path / 'iter_60.pth'), '--work-dir', str(tmp_path),
        '--cfg-options', f'experiment_name=test_{uuid.uuid4().hex[:6]}'])
    assert 0 < metrics['toy/loss'] < first


def test_ddp_two_processes_equal_one_at_the_same_global_batch(tmp_path):
    train(tmp_path / 'one')
    train(tmp_path / 'ddp', '--launcher', 'pytorch', '--cfg-options',
          'train_dataloader.batch_size=4', nproc=2)
    one = torch.load(tmp_path / 'one' / 'iter_8.pth', weights_only=True)
    ddp = torch.load(tmp_path / 'ddp' / 'iter_8.pth', weights_only=True)
    # Same images, same per-image noise; only the float32 summation order of the gradient
    # differs (two half-batch means all-reduced vs one mean): a few ulps per step that
    # Adam carries for 8 steps, measured <= 6e-8. 1e-6 is far below any real mismatch
    # (a wrong sample or seed moves weights by >= 1e-3).
    for key in ('state_dict', 'ema_state_dict'):
        for name, value in one[key].items():
            torch.testing.assert_close(ddp[key][name], value, rtol=1e-5, atol=1e-6)


def test_end_distributed_destroys_the_process_group_a_run_left():
    """Tools end their distributed runs by destroying the group (a live gloo group at
    interpreter exit can abort a finished rank); without one it does nothing."""
    import torch.distributed as dist

    from flexgen.apis.runners import end_distributed
    end_distributed()
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0,
                            world_size=1)
    assert dist.is_initialized()
    end_distributed()
    assert not dist.is_initialized()
