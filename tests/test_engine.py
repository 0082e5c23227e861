"""flexgen.engine: O(1) exact resume, weights_only + crash-safe checkpoints, autocast."""
import os
import os.path as osp
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import DefaultSampler
from mmengine.hooks import EMAHook
from mmengine.logging import HistoryBuffer
from mmengine.optim import OptimWrapper
from mmengine.runner import CheckpointLoader, Runner
from mmengine.runner.loops import _InfiniteDataloaderIterator
from torch.utils.data import DataLoader

import flexgen
from flexgen.engine import AutocastOptimWrapper, FlexTrainLoop, to_plain
from flexgen.engine.checkpoint import plain_to_history_buffer

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY_CFG = osp.join(ROOT, 'tests', 'configs', 'toy_train.py')
K = 4  # checkpoint / resume iteration; the straight run goes to 2K

flexgen.register_all_modules()
import toy_modules  # noqa: E402  (registers the toy parts; tests/ is on sys.path under pytest)


def run_toy(work_dir, max_iters, resume_from=None):
    cfg = Config.fromfile(TOY_CFG)
    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = max_iters
    cfg.default_hooks.checkpoint.interval = K
    cfg.custom_hooks.append(dict(type='LossRecorderHook'))
    cfg.experiment_name = f'toy_{uuid.uuid4().hex[:8]}'
    if resume_from is not None:
        cfg.resume, cfg.load_from = True, str(resume_from)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


def hook(runner, cls):
    return next(h for h in runner.hooks if type(h).__name__ == cls.__name__)


def assert_states_equal(a, b, where=''):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_states_equal(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f'{where}[{i}]')
    else:
        assert a == b, where


@pytest.fixture(scope='module')
def straight_and_resumed(tmp_path_factory):
    straight = run_toy(tmp_path_factory.mktemp('straight'), 2 * K)
    work = tmp_path_factory.mktemp('split')
    first = run_toy(work, K)
    resumed = run_toy(work, 2 * K, resume_from=work / f'iter_{K}.pth')
    return straight, first, resumed, work


def test_resume_is_bit_identical(straight_and_resumed):
    straight, first, resumed, _ = straight_and_resumed
    losses = hook(first, toy_modules.LossRecorderHook).losses + \
        hook(resumed, toy_modules.LossRecorderHook).losses
    assert torch.equal(torch.stack(losses),
                       torch.stack(hook(straight, toy_modules.LossRecorderHook).losses))
    assert_states_equal(straight.model.state_dict(), resumed.model.state_dict(), 'model')
    assert_states_equal(hook(straight, EMAHook).ema_model.state_dict(),
                        hook(resumed, EMAHook).ema_model.state_dict(), 'ema')
    assert_states_equal(straight.optim_wrapper.state_dict(),
                        resumed.optim_wrapper.state_dict(), 'optimizer')
    # The log-smoothing buffers were saved as plain data and rebuilt exactly.
    np.testing.assert_array_equal(straight.message_hub.get_scalar('train/loss').data[0],
                                  resumed.message_hub.get_scalar('train/loss').data[0])


def test_resume_loads_no_skipped_sample(straight_and_resumed):
    _, _, resumed, _ = straight_and_resumed
    batch = resumed.train_dataloader.batch_sampler.batch_size
    # Only the K resumed steps were loaded: the first K were skipped, not replayed.
    assert resumed.train_dataloader.dataset.loaded == K * batch


def test_checkpoint_loads_with_weights_only(straight_and_resumed):
    *_, work = straight_and_resumed
    ckpt = torch.load(work / f'iter_{2 * K}.pth', weights_only=True)
    assert ckpt['meta']['iter'] == 2 * K
    assert {'state_dict', 'optimizer', 'ema_state_dict', 'message_hub'} <= ckpt.keys()
    buffer = ckpt['message_hub']['log_scalars']['train/loss']
    assert buffer['type'] == 'HistoryBuffer' and buffer['log_history'].dtype == torch.float64


def test_history_buffer_round_trip_is_exact():
    buffer = HistoryBuffer(max_length=5)
    for value in [0.1, 1 / 3, 2.5]:
        buffer.update(value, count=2)
    plain = to_plain({'b': buffer, 'n': np.float32(1.5), 'a': np.arange(3)})
    assert isinstance(plain['n'], float) and torch.equal(plain['a'], torch.arange(3))
    back = plain_to_history_buffer(plain['b'])
    np.testing.assert_array_equal(back.data[0], buffer.data[0])
    np.testing.assert_array_equal(back.data[1], buffer.data[1])
    assert back.max_length == 5


def test_loader_refuses_pickled_code(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'obj': HistoryBuffer()}, path)
    with pytest.raises(RuntimeError, match='weights_only=True'):
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')


KILL_SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {tests!r})
    import flexgen, toy_modules
    from flexgen.engine import checkpoint
    from mmengine.config import Config
    from mmengine.runner import Runner
    flexgen.register_all_modules()
    big_writes = []
    real_write = checkpoint._write
    def dying_write(f, data):
        if len(data) > 1000:
            big_writes.append(len(data))
            if len(big_writes) == 2:  # the second checkpoint: half of it, then die
                f.write(data[:len(data) // 2]); f.flush(); os._exit(17)
        real_write(f, data)
    checkpoint._write = dying_write
    cfg = Config.fromfile({cfg!r})
    cfg.work_dir = {work!r}
    cfg.train_cfg.max_iters = 4
    cfg.default_hooks.checkpoint.interval = 2
    Runner.from_cfg(cfg).train()
''')


def test_kill_mid_write_keeps_previous_checkpoint(tmp_path):
    script = KILL_SCRIPT.format(tests=osp.join(ROOT, 'tests'), cfg=TOY_CFG, work=str(tmp_path))
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert not (tmp_path / 'iter_4.pth').exists()
    assert any(name.endswith('.tmp') for name in os.listdir(tmp_path))  # the half file
    pointer = (tmp_path / 'last_checkpoint').read_text()
    assert pointer == str(tmp_path / 'iter_2.pth')
    ckpt = torch.load(pointer, weights_only=True)
    assert ckpt['meta']['iter'] == 2
    # Auto-resume picks it up, finishes, and removes the leftover temporary file.
    cfg = Config.fromfile(TOY_CFG)
    cfg.work_dir, cfg.resume, cfg.load_from = str(tmp_path), True, None
    cfg.train_cfg.max_iters = 4
    cfg.default_hooks.checkpoint.interval = 2
    cfg.experiment_name = f'toy_{uuid.uuid4().hex[:8]}'
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 4
    assert torch.load(tmp_path / 'iter_4.pth', weights_only=True)['meta']['iter'] == 4
    assert not any(name.endswith('.tmp') for name in os.listdir(tmp_path))


# ----------------------------------------------------------------- the loop's resume
def _loop_on(dataloader):
    loop = FlexTrainLoop.__new__(FlexTrainLoop)  # only the dataloader parts are exercised
    loop.dataloader = dataloader
    loop.dataloader_iterator = _InfiniteDataloaderIterator(dataloader)
    return loop


def test_skip_uses_set_start_iter():
    dataset = toy_modules.ToyVectorDataset(num=16)
    sampler = toy_modules.ToyStepBatchSampler(
        DefaultSampler(dataset, shuffle=False), batch_size=4, seed=1)
    stream = iter(toy_modules.ToyStepBatchSampler(
        DefaultSampler(dataset, shuffle=False), batch_size=4, seed=1))
    want = [next(stream) for _ in range(6)][5]
    loop = _loop_on(DataLoader(dataset, batch_sampler=sampler))
    loop._skip_to(5)
    batch = next(loop.dataloader_iterator)
    assert batch['data_samples']['index'].tolist() == want
    assert dataset.loaded == 4  # one batch, the resumed one


def test_skip_falls_back_to_replay_with_warning(monkeypatch):
    messages = []
    monkeypatch.setattr('flexgen.engine.loops.print_log',
                        lambda msg, **kwargs: messages.append(msg))
    dataset = toy_modules.ToyVectorDataset(num=16)
    loop = _loop_on(DataLoader(dataset, batch_size=2))
    loop._skip_to(3)
    assert dataset.loaded == 6
    assert next(loop.dataloader_iterator)['data_samples']['index'].tolist() == [6, 7]
    assert len(messages) == 1 and 'BatchSampler(sampler=SequentialSampler)' in messages[0]


# ----------------------------------------------------------------- autocast
def test_autocast_runs_matmuls_in_bf16():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, generator=g)
    wrapper = AutocastOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert wrapper.device_type == 'cpu' and wrapper.loss_scaler is None
    with wrapper.optim_context(model):
        y = model(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, torch.nn.functional.linear(
        x.bfloat16(), model.weight.bfloat16(), model.bias.bfloat16()))
    wrapper.backward(y.float().square().mean())  # no loss scaling: bf16 needs none
    assert model.weight.dtype == torch.float32 and model.weight.grad.dtype == torch.float32
    wrapper.step()
    plain = OptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with plain.optim_context(model):
        assert model(x).dtype == torch.float32


def test_autocast_rejects_bad_dtype():
    with pytest.raises(ValueError, match="dtype='float32'"):
        AutocastOptimWrapper(dtype='float32', optimizer=torch.optim.SGD(
            torch.nn.Linear(2, 2).parameters(), lr=0.1))
